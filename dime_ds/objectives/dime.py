"""DIME-FM: unpaired images and unpaired sentences, a frozen teacher (live, ZeRO-3 sharded or read
from the embed stage's cache), and the KD terms L_vl, L_pvl, L_ud over the global batch; optionally
CLIP-CID's cluster and instance terms beside them (objectives/cid.py)."""
from __future__ import annotations


import torch
import torch.nn.functional as F

from typing import NamedTuple, Sequence

from dime_ds.config.schema import ClusterConfig, DataConfig, LossConfig, RootConfig, TeacherConfig
from dime_ds.config.teachers import ensemble_weights, teacher_cache_dir, teacher_list, teacher_scale
from dime_ds.data.keep import KeepList
from dime_ds.data.loaders import BatchStream, image_batches, text_batches, view_batches
from dime_ds.data.pipelines import image_transform, preprocess_size
from dime_ds.data.shards import list_shards
from dime_ds.data.workers import loader_workers
from dime_ds.data.views import ViewRecipe, ViewSampler
from dime_ds.models.encoder import Encoder
from dime_ds.losses.dime import dime_loss
from dime_ds.models import PRECISIONS, Student, student_preprocess_cfg, student_tokenizer
from dime_ds.objectives.base import Objective, RunContext, StudentForward
from dime_ds.objectives.cid import CENTRES, CidTerms
from dime_ds.objectives.teacher_source import TeacherSource


def space_key(name: str, k: int) -> str:
    """The features/targets entry of teacher k's space: `image` for the first teacher, `image_1`, ..."""
    return name if k == 0 else f"{name}_{k}"


def repreprocess(images: torch.Tensor, src: dict, dst: dict) -> torch.Tensor:
    """Images transformed at preprocessing `src` as if at `dst`: resized, renormalised."""
    if preprocess_size(src) != preprocess_size(dst):
        images = F.interpolate(images, size=preprocess_size(dst), mode="bicubic", antialias=True, align_corners=False)
    if list(src["mean"]) != list(dst["mean"]) or list(src["std"]) != list(dst["std"]):
        def vec(v):
            return torch.tensor(v, dtype=images.dtype).view(1, -1, 1, 1)
        images = (images * vec(src["std"]) + vec(src["mean"]) - vec(dst["mean"])) / vec(dst["std"])
    return images


class TeacherPlan(NamedTuple):
    """One teacher of the run, as the objective builds its source."""

    cfg: TeacherConfig
    cache_dir: str | None  # where it reads when cached
    key: str  # its config key, for messages
    scale: float  # its logit scale in the targets


def teacher_plans(cfg: RootConfig) -> list[TeacherPlan]:
    """`teacher`, then ensemble.teachers, each with its cache directory and logit scale."""
    return [TeacherPlan(t, teacher_cache_dir(cfg, i), "teacher" if i == 0 else f"ensemble.teachers[{i - 1}]",
                        teacher_scale(cfg, i)) for i, t in enumerate(teacher_list(cfg))]


class DimeObjective(Objective):
    name = "dime"
    SHARED_FEATURES = (CENTRES,)  # learnable CLIP-CID centres: one value per step, not per sample

    def __init__(self, teachers: Sequence[TeacherPlan], data_cfg: DataConfig, loss_cfg: LossConfig, ctx: RunContext,
                 views: ViewRecipe | None = None, view_choice: str = "random", cluster_cfg: ClusterConfig | None = None,
                 weights: Sequence[float] | None = None, combine: str = "prob", cid_teacher: int = 0):
        self.data_cfg, self.loss_cfg, self.ctx = data_cfg, loss_cfg, ctx
        # K fixed views per image (embed.views > 1): the images show them, live or cached teacher alike
        self.views, self.view_choice = views, view_choice
        self.sources = [TeacherSource(t.cfg, ctx.device, ctx.micro_batch, augmented=data_cfg.augment,
                                      zero3_wrap=ctx.zero3_wrap, views=views, cache_dir=t.cache_dir, key=t.key)
                        for t in teachers]
        self.teacher = self.sources[0]  # its text tower and space are the student's
        self.scales = [t.scale for t in teachers]
        self.weights = list(weights) if weights is not None else [1.0 / len(teachers)] * len(teachers)
        self.combine, self.cid_teacher = combine, cid_teacher
        self.target_dim = self.teacher.embed_dim
        self.ensemble_dims = tuple(s.embed_dim for s in self.sources[1:])
        self.cid = CidTerms(loss_cfg, cluster_cfg or ClusterConfig(), self.sources[cid_teacher].embed_dim, ctx) \
            if loss_cfg.w_cluster > 0 or loss_cfg.w_instance > 0 else None
        self.images: BatchStream | None = None
        self.texts: BatchStream | None = None
        self.student_preprocess: dict | None = None
        self.student_tokenize = None  # the student's own tokenizer when it has a text tower
        self._last: tuple[torch.Tensor, ...] | None = None  # the last batch's embeddings, for the TB image

    @classmethod
    def from_config(cls, cfg: RootConfig, ctx: RunContext) -> "DimeObjective":
        return cls(teacher_plans(cfg), cfg.data, cfg.loss, ctx, ViewRecipe.from_config(cfg), cfg.embed.choice,
                   cfg.cluster, ensemble_weights(cfg), cfg.ensemble.combine, cfg.ensemble.cid_teacher)

    @property
    def _stream_teacher(self) -> TeacherSource | None:
        """The live teacher whose preprocessing and tokenizer the streams use (the first live one)."""
        return next((s for s in self.sources if s.live), None)

    @property
    def _view_cache(self):
        """A cached teacher's image cache, whose view parameters every teacher's images then show."""
        return next((s.images for s in self.sources if not s.live), None)

    # ------------------------------------------------------------------ streams
    def start(self, student: Student, state: dict | None) -> None:
        data, ctx, state = self.data_cfg, self.ctx, state or {}
        self.student_preprocess = student_preprocess_cfg(student.model_cfg)
        self.student_tokenize = student_tokenizer(student) if student.has_text else None
        common = dict(seed=ctx.seed, rank=ctx.world.rank, world=ctx.world.world_size,
                      workers=loader_workers(data.workers, ctx.world.local_world_size),
                      shuffle_buffer=data.shuffle_buffer)
        keep = KeepList(data.keep) if data.keep else None  # CLIP-CID's semantic balance: kept images only
        if self.views is not None:  # a cache's views come with their parameters; a live teacher's are drawn
            sampler = ViewSampler(self.views, self._stream_preprocess(), seed=ctx.seed, choice=self.view_choice,
                                  augment=data.augment, cache=self._view_cache)
            self.images = view_batches(list_shards(data.images), sampler, ctx.micro_batch,
                                       start=state.get("images"), keep=keep, **common)
        else:
            transform = image_transform(self._stream_preprocess(), train=data.augment,
                                        crop_scale_min=data.crop_scale_min)
            self.images = image_batches(list_shards(data.images), transform, ctx.micro_batch,
                                        start=state.get("images"), keep=keep, **common)
        stream = self._stream_teacher
        tokenize = stream.tokenizer if stream is not None else self.student_tokenize  # None: keys are all caches need
        self.texts = text_batches(list_shards(data.texts), tokenize, ctx.micro_batch, start=state.get("texts"),
                                  **common)
        if self.cid is not None:
            self.cid.step = state.get("cid_step", 0)

    def _stream_preprocess(self) -> dict:
        """Images are transformed once, at the (first) live teacher's preprocessing when one runs."""
        stream = self._stream_teacher
        return stream.preprocess_cfg if stream is not None else self.student_preprocess

    def state_dict(self) -> dict:
        state = {"images": self.images.state_dict(), "texts": self.texts.state_dict()}
        if self.cid is not None:
            state["cid_step"] = self.cid.step
        return state

    def skipped(self) -> dict[str, int]:
        counts = {"images": self.images.skipped, "texts": self.texts.skipped}
        if self.data_cfg.keep:
            counts["images_not_kept"] = self.images.not_kept
        return counts

    def next_batch(self) -> dict:
        """The streams' batches plus the student's own inputs, prepared once: with accumulation the
        student forwards each micro-batch twice."""
        images, texts = next(self.images), next(self.texts)
        student = {"images": repreprocess(images["images"], self._stream_preprocess(), self.student_preprocess),
                   "tokens": None}
        # tokenized for the student already unless a live teacher took the stream's
        if self.student_tokenize is not None:
            student["tokens"] = (texts["tokens"] if self._stream_teacher is None
                                 else self.student_tokenize(texts["texts"]))
        return {"images": images, "texts": texts, "student": student}

    # ------------------------------------------------------------------ step
    def targets(self, batch: dict) -> dict:
        """Every teacher's embeddings of the batch: `image`/`text` the first's, `image_k`/`text_k` the k-th's."""
        images, texts = batch["images"], batch["texts"]
        stream, out = self._stream_teacher, {}
        for k, source in enumerate(self.sources):
            pixels, tokens = images["images"], texts.get("tokens")
            if source.live and source is not stream:  # a further live teacher: its own preprocessing, tokens
                pixels = repreprocess(pixels, self._stream_preprocess(), source.preprocess_cfg)
                tokens = source.tokenizer(texts["texts"])
            t_img, t_txt = source.embed(pixels, tokens, images["keys"], texts["keys"], image_views=images.get("views"))
            out[space_key("image", k)], out[space_key("text", k)] = t_img, t_txt
        return {**out, **(self.cid.batch_labels(images["keys"]) if self.cid else {})}

    def student_features(self, student: StudentForward, batch: dict) -> dict:
        device, inputs = self.ctx.device, batch["student"]
        tokens = inputs["tokens"].to(device) if inputs["tokens"] is not None else None
        out = student(images=inputs["images"].to(device, self.ctx.precision.dtype), tokens=tokens)
        spaces = {space_key("image", k): x.float() for k, x in enumerate(out.image_spaces, start=1)}
        return {"image": out.image.float(), "text": out.text.float() if out.text is not None else None, **spaces,
                **(self.cid.student_features() if self.cid else {})}

    def trainable_module(self):
        return self.cid.learned if self.cid is not None else None

    def losses(self, features: dict, targets: dict) -> dict[str, torch.Tensor]:
        t_img, t_txt = targets["image"], targets["text"]
        # No student text tower: the teacher's sentences speak for it (`s_txt is t_txt`).
        s_img, s_txt = features["image"], t_txt if features["text"] is None else features["text"]
        self._last = (t_img.detach(), t_txt.detach(), s_img.detach(), s_txt.detach())
        extra = [(targets[space_key("image", k)], targets[space_key("text", k)], features[space_key("image", k)])
                 for k in range(1, len(self.sources))]
        losses = dime_loss(t_img, t_txt, s_img, s_txt, self.loss_cfg, extra, self.weights, self.scales, self.combine)
        if self.cid is None:
            return losses
        c = space_key("image", self.cid_teacher)  # CLIP-CID's terms live in one teacher's space
        return self.cid.add_terms(losses, features[c], targets[c], features, targets)

    # ------------------------------------------------------------------ evaluation, reporting
    def borrowed_text(self):
        if not self.teacher.live:
            return None  # a cached teacher has no text tower to lend
        return (lambda tokens: self.teacher.embed(None, tokens)[1]), self.teacher.tokenizer

    def teacher_encoder(self) -> Encoder | None:
        if not self.teacher.live:
            return None
        return Encoder("teacher", lambda x: self.teacher.embed(x, None)[0], lambda t: self.teacher.embed(None, t)[1],
                       self.teacher.tokenizer, self.teacher.preprocess_cfg, self.ctx.device, PRECISIONS["fp32"].dtype)

    def similarity_sample(self, n: int = 16):
        if self._last is None:
            return None
        t_img, t_txt, s_img, s_txt = (F.normalize(x[:n], dim=-1) for x in self._last)
        return t_img @ t_txt.t(), s_img @ s_txt.t()

    def live_teacher_cfgs(self) -> list[dict]:
        return [s.teacher.model_cfg for s in self.sources if s.live]

    def info(self) -> dict:
        info = {"teachers": len(self.sources)} if len(self.sources) > 1 else {}
        if self.teacher.live:
            info["teacher_image_params"] = sum(p.numel() for p in self.teacher.teacher.model.visual.parameters())
        return info
