"""Typed schema of every config section. Each knob has exactly one owner here, with its default,
its allowed values (an enum type) and its range check (positive(), non_negative(), fraction():
config/validate.py applies them); YAML in configs/ only sets values. Registered with Hydra's
ConfigStore so unknown keys, wrong types and values outside an enum fail at composition time,
naming the key."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from omegaconf import MISSING


class Choice(str, Enum):
    """A value from a fixed set. A member is its string: it compares, hashes, formats and saves as
    its value, so code reads `cfg.teacher.shard == "zero3"` and YAML stays plain."""

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


CHECK = "check"  # field metadata key: the range rule validate.py applies to the value


def positive(default: Any) -> Any:
    return field(default=default, metadata={CHECK: "positive"})


def non_negative(default: Any) -> Any:
    return field(default=default, metadata={CHECK: "non_negative"})


def fraction(default: Any) -> Any:
    """A value in [0, 1]."""
    return field(default=default, metadata={CHECK: "fraction"})


class Device(Choice):
    auto = "auto"  # cuda when available, else cpu
    cpu = "cpu"
    cuda = "cuda"


class PrecisionName(Choice):
    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class TeacherShard(Choice):
    replicate = "replicate"  # a copy per rank
    zero3 = "zero3"  # parameters partitioned over ranks (ZeRO-3 inference engine)


class TeacherSource(Choice):
    live = "live"  # run the teacher
    cache = "cache"  # read embeddings written by the embed stage


class StudentText(Choice):
    teacher = "teacher"  # the teacher's frozen text tower
    own = "own"  # a student text tower, distilled


class Objective(Choice):
    dime = "dime"  # DIME-FM on unpaired images and sentences
    clip = "clip"  # contrastive CLIP loss on image-caption pairs


class OptimizerName(Choice):
    adamw = "adamw"


class Schedule(Choice):
    cosine = "cosine"
    constant = "constant"


class Backend(Choice):
    auto = "auto"  # nccl on GPUs, gloo on CPU
    nccl = "nccl"
    gloo = "gloo"


class MatchIndex(Choice):
    flat = "flat"  # exact
    ivf = "ivf"  # approximate, for corpora that do not fit


class MatchStage(Choice):
    embed = "embed"
    match = "match"
    all = "all"  # embed, then match


class CurateStage(Choice):
    metaclip = "metaclip"
    semantic_balance = "semantic_balance"
    cluster = "cluster"


class CurateInput(Choice):
    pool = "pool"
    grounded = "grounded"


class TextPool(Choice):
    raw = "raw"  # data.corpus, else data.texts
    curated = "curated"  # the curation stage's <curate.out_dir>/corpus


class Combine(Choice):
    prob = "prob"  # weighted mean of the teachers' softmax distributions (MobileCLIP2's default)
    logit = "logit"  # softmax of the weighted mean of their (scaled) logits


class ViewChoice(Choice):
    random = "random"
    round_robin = "round_robin"


class EvalTask(Choice):
    zeroshot = "zeroshot"
    retrieval = "retrieval"
    linear_probe = "linear_probe"


class EvalMetric(Choice):
    top1 = "top1"
    mean_per_class = "mean_per_class"  # ELEVATER's headline for some sets


@dataclass
class TeacherConfig:
    # OpenCLIP architecture name (ViT-L-14), or local-dir:<dir> / hf-hub:<repo> for a model directory.
    arch: str = "ViT-L-14"
    # Pretrained tag (openai, laion2b_s32b_b82k, ...) or a local weights file (.safetensors/.pt/.bin).
    pretrained: Optional[str] = "openai"
    precision: PrecisionName = PrecisionName.auto  # auto = fp16 on GPU, bf16 on CPUs with native bf16, fp32 on others
    shard: TeacherShard = TeacherShard.replicate  # how the teacher is held: a copy per rank, or ZeRO-3 partitioned
    source: TeacherSource = TeacherSource.live  # run the teacher, or read the embed stage's cache (cache_dir)
    cache_dir: Optional[str] = None  # embed-stage output directory, for source=cache
    # This teacher's fixed logit scale in the DIME-FM targets (MobileCLIP's two teachers: 70 and 60);
    # null: loss.scale, the student's. Each teacher of an ensemble has its own.
    scale: Optional[float] = positive(None)


@dataclass
class StudentConfig:
    # An OpenCLIP architecture name (ViT-B-32, RN50, convnext_tiny, MobileCLIP2-S0, ...; timm towers are
    # built from timm's code, never downloaded) or a path to an OpenCLIP model-config .json file;
    # ignored when model_cfg is given
    arch: str = "ViT-B-32"
    model_cfg: Optional[Dict[str, Any]] = None  # inline OpenCLIP model config (embed_dim, vision_cfg, text_cfg)
    text: StudentText = StudentText.teacher  # the text tower: the teacher's, frozen, or the student's own, distilled
    # Local weights to start the image tower from (.safetensors, or a torch file read weights-only): a
    # timm or OpenCLIP state dict; keys are matched to the tower and the match is reported. null: random
    init_image: Optional[str] = None
    # The training precision: auto = bf16 on GPUs that have it (fp16 on older ones), bf16 on CPUs with
    # native bf16, fp32 on other CPUs; a DeepSpeed JSON's explicit bf16/fp16 section wins
    precision: PrecisionName = PrecisionName.auto


@dataclass
class DataConfig:
    images: str = MISSING  # unpaired image shards: directory, glob or brace pattern
    texts: str = MISSING  # unpaired sentence shards distillation reads (the grounded corpus)
    corpus: Optional[str] = None  # the raw sentence corpus the embed/match stages ground; null: data.texts
    paired: Optional[str] = None  # image-caption shards (CLIP-loss training: demo teacher, baseline)
    workers: Any = "auto"  # loader processes per rank: auto (from the rank's cores: data/workers.py) or a count
    shuffle_buffer: int = 1000  # samples each loader worker shuffles among
    augment: bool = True  # random resized crop + horizontal flip, as in the paper
    # Pairs (loss.objective=clip) without augmentation stay decoded after their first epoch, up to this
    # many MB per loader process: a small paired set read for many epochs is decoded once. 0: never
    decoded_cache_mb: int = non_negative(0)
    crop_scale_min: float = fraction(0.5)  # smallest crop area (share of the image) of the random resized crop
    # a keep list (one image key a line) or the semantic_balance stage's out dir (its keep.txt): the
    # training image stream skips, and counts, the images not in it (no shard is rewritten)
    keep: Optional[str] = None


@dataclass
class LossConfig:
    objective: Objective = Objective.dime  # the training objective this loss section configures
    w_vl: float = non_negative(0.7)  # weight of L_vl, the image-text KD
    w_pvl: float = non_negative(0.3)  # weight of L_pvl, the pseudo image-text KD
    w_ud: float = non_negative(0.0)  # weight of L_ud, the uni-modal KD
    t_vl: float = positive(1.0)  # temperature of L_vl
    t_pvl: float = positive(3.0)  # temperature of L_pvl
    t_ud: float = positive(7.0)  # temperature of L_ud
    scale: float = positive(100.0)  # fixed logit scale of the cosine similarities
    # CLIP-CID terms beside DIME-FM's (objective dime only): total += w_cluster * cluster + w_instance *
    # instance. 0 leaves a run exactly DIME-FM. Scale, margin and temperature are the UNICOM/MLCD line's;
    # CLIP-CID's own values are not public (docs/design.md).
    w_cluster: float = non_negative(0.0)  # cluster discrimination over the k-means centres of `cluster.out_dir`
    w_instance: float = non_negative(0.0)  # instance discrimination: student images against the teacher's, InfoNCE
    cluster_scale: float = positive(32.0)  # CLIP-CID cluster term: logit scale of the margin softmax
    cluster_margin: float = non_negative(0.3)  # additive angular margin on the pseudo-class, radians
    instance_temperature: float = positive(0.07)  # CLIP-CID instance term: InfoNCE temperature
    # Share of the negative centres scored per step (all positives of the global batch always are):
    # 1 is the exact softmax; partial FC's 0.1 pays off only at 10^5-10^6 centres.
    cluster_sample_rate: float = field(default=1.0, metadata={CHECK: "positive_fraction"})
    learn_centres: bool = False  # train the centres (initialised from the teacher's centroids)


@dataclass
class EnsembleConfig:
    """Teachers beside `teacher` (MobileCLIP/MobileCLIP2's ensembles): every DIME-FM term takes the
    combined distribution of all of them as its target. `teacher` stays the first: its text tower is
    the one student.text=teacher borrows, and its space the one the student's exported embedding lives
    in; the student learns one extra image projection per further teacher (training only, for L_pvl).
    Command line: ensemble.teachers=[{arch:'local-dir:/b',pretrained:null}]."""

    # Further teacher sections, each as `teacher` has them (arch, pretrained, precision, shard, source,
    # cache_dir, scale); a cached one with cache_dir null reads ${match.embed_dir}/teacher<i> (i = 1, 2, ...),
    # where the embed stage writes it
    teachers: List[TeacherConfig] = field(default_factory=list)
    weights: Optional[List[float]] = None  # one per teacher, `teacher` first; null: equal; normalised to sum 1
    combine: Combine = Combine.prob  # how the teachers' distributions are combined into each term's target
    cid_teacher: int = non_negative(0)  # the teacher whose space CLIP-CID's terms use (0: `teacher`)


@dataclass
class OptimConfig:
    name: OptimizerName = OptimizerName.adamw  # the optimizer
    lr: float = positive(8e-4)  # peak learning rate (after warmup)
    weight_decay: float = non_negative(0.05)  # AdamW weight decay, on weight matrices only (engine/param_groups.py)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])  # AdamW betas
    eps: float = positive(1e-6)  # AdamW epsilon
    schedule: Schedule = Schedule.cosine  # both after linear warmup
    warmup_steps: int = non_negative(1000)  # linear warmup steps
    min_lr: float = non_negative(0.0)  # learning rate at the end of the cosine schedule
    steps: int = positive(10000)  # optimizer steps of the whole run
    global_batch_size: int = positive(4096)  # images (and sentences) per optimizer step, all ranks together
    grad_accum: int = positive(1)  # micro-batches per optimizer step; the loss spans all of them (engine/accumulate.py)
    grad_clip: float = non_negative(1.0)  # gradient norm clip; 0: none
    # torch's fused AdamW kernel (CPU and CUDA): one pass over the fp32 masters per step instead of
    # one per arithmetic op, a much shorter engine step (docs/performance.md)
    fused: bool = True


@dataclass
class DistConfig:
    backend: Backend = Backend.auto  # collective backend
    # auto (zero0 on one rank, zero1 on more: engine/ds_config.py) | a name in ds_configs/ | a path to a
    # DeepSpeed JSON (engine knobs only)
    ds_config: str = "auto"
    timeout_min: int = 30  # collective timeout: how long a rank waits in a collective before failing
    # Every multi-rank stage: a rank whose heartbeat stops this long is taken as dead and the others end
    # (status 3, requeued within slurm.max_requeues) instead of waiting timeout_min; 0 = no heartbeats.
    dead_rank_s: float = 60.0


@dataclass
class LogConfig:
    tensorboard: bool = True  # write TensorBoard events under <run_dir>/tensorboard (rank 0)
    every_n_steps: int = positive(10)  # log and write scalars every N optimizer steps
    progress: bool = True  # console progress bars with ETA (rank 0)
    # One device's peak TFLOP/s in the training precision (dense, e.g. 989 for an H100 SXM in bf16):
    # perf/mfu = perf/model_tflops_per_device / this; null: the achieved TFLOP/s alone
    peak_tflops: Optional[float] = None


@dataclass
class CkptConfig:
    dir: str = "${run_dir}/checkpoints"  # where checkpoints go
    every_n_steps: int = non_negative(1000)  # checkpoint every N steps; 0: at the end (and when stopped) only
    resume: Optional[str] = None  # latest | a checkpoint tag | null
    keep_last: int = positive(3)  # checkpoints kept (older ones deleted)


@dataclass
class MatchConfig:
    stop_ratio: float = fraction(0.95)  # stop when a round keeps more than this share of remaining images
    topk: int = positive(16)  # candidate list length per image, reused across rounds
    block_size: int = positive(1_000_000)  # text embeddings searched per block
    index: MatchIndex = MatchIndex.flat  # faiss index of Algorithm 1's text search
    nlist: int = 4096  # index=ivf: inverted lists
    nprobe: int = 32  # index=ivf: lists searched per query
    text_map: Optional[str] = None  # optional linear map (.npy, d x d) applied to text embeddings
    # the sentence pool the embed and match stages ground: raw = data.corpus (else data.texts) |
    # curated = the curation stage's <curate.out_dir>/corpus (pipeline curate -> embed -> match -> distill)
    pool: TextPool = TextPool.raw
    # where the embed stage writes (and the match stage reads) the teacher's caches
    embed_dir: str = "${work_dir}/embeddings"
    out_dir: str = "${work_dir}/grounded"  # where the match stage writes the grounded corpus, assignment and report
    batch_size: int = positive(256)  # samples per teacher forward in the embed stage
    stage: MatchStage = MatchStage.match  # what `python -m dime_ds.match` runs
    # With an ensemble: null scores image-sentence pairs by the weighted mean of every teacher's cosine
    # similarity (ensemble.weights); i: by teacher i alone (0: `teacher`)
    teacher: Optional[int] = non_negative(None)
    shard_size: int = 10000  # grounded-corpus samples per output tar shard


@dataclass
class EmbedConfig:
    """Augmented views in the teacher cache (MobileCLIP's reinforced datasets): the embed stage stores
    K views per image with their crop/flip parameters; distillation re-applies the chosen view's
    parameters for the student. The crop scale is data.crop_scale_min, as in training."""

    views: int = positive(1)  # K views per image; 1: the plain centre view only (the cache format before views)
    seed: int = non_negative(0)  # view parameters are drawn from (seed, image key, view index) alone
    # which view an image shows in an epoch (data.augment=true): random from (run seed, key, epoch)
    # | round_robin: every view once per K epochs
    choice: ViewChoice = ViewChoice.random


@dataclass
class CurateConfig:
    """MetaCLIP curation of the sentence pool (data.corpus, else data.texts) before it is embedded
    and grounded: `python -m dime_ds.curate stage=metaclip`. Exactly one of t, target_size,
    tail_share sets the balancing threshold."""

    stage: CurateStage = CurateStage.metaclip  # what `python -m dime_ds.curate` runs
    # what MetaCLIP balances: pool = the raw sentence pool, before embed and match (pipeline curate ->
    # embed -> match -> distill) | grounded = Algorithm 1's grounded corpus <match.out_dir>/corpus, after
    # match (embed -> match -> curate -> distill; train on it with data.texts=<out_dir>/corpus)
    input: CurateInput = CurateInput.pool
    metadata: Optional[str] = None  # entry list: MetaCLIP's metadata.json (a JSON list) or one entry a line
    t: Optional[float] = None  # head/tail threshold: entries matched more often are capped near t texts
    target_size: Optional[int] = None  # or: the t whose expected curated size is this many sentences
    tail_share: Optional[float] = None  # or: the t whose tail share p(t) is this (MetaCLIP's carry-over)
    seed: int = 0  # the keep draw of a sentence hashes (seed, its key)
    out_dir: str = "${work_dir}/curated"  # curated corpus, report and plots
    top_entries: int = positive(30)  # largest entries listed in the report


@dataclass
class BalanceConfig:
    """CLIP-CID's image semantic balance (`python -m dime_ds.curate stage=semantic_balance`): images
    whose teacher embeddings lie within cosine distance beta are joined (union-find); each group
    keeps the image nearest its centroid. The paper's own beta is not public to us."""

    beta: float = positive(0.1)  # join i and j when 1 - cos(v_i, v_j) < beta (DanQing's value)
    # neighbours a query asks faiss for first; doubled for a query whose k-th is still within beta
    k: int = positive(64)
    max_k: int = positive(2048)  # largest kNN k (faiss's GPU cap); a query past it is finished by a CPU range search
    # >0: spherical k-means buckets, pairs searched within a bucket only (SemDeDup; approximate)
    buckets: int = non_negative(0)
    block_size: int = positive(65536)  # query rows searched at once, and rows of the base index held at once
    seed: int = 0  # bucket k-means
    out_dir: str = "${match.embed_dir}/balanced"  # keep.txt, report.md/json, component_sizes.png, removed_groups.png
    groups_shown: int = non_negative(6)  # removed groups drawn on the report's contact sheet


@dataclass
class ClusterConfig:
    """CLIP-CID pseudo-classes: spherical k-means of the teacher's image embeddings
    (`python -m dime_ds.curate stage=cluster`), read by the cluster-discrimination loss."""

    # number of pseudo-classes (CLIP-CID's line uses up to 10^6; the paper's value is not public)
    k: int = positive(1000)
    niter: int = positive(20)  # k-means iterations
    seed: int = 0  # k-means initialisation
    out_dir: str = "${match.embed_dir}/clusters"  # centroids.npy, labels.npz, manifest.json


@dataclass
class EvalDatasetConfig:
    # A dataset directory: webdataset shards (`cls` labels or `txt` captions, one per line) or an
    # ImageFolder tree (one subdirectory per class); split subdirectories (test/, train/) are used
    # when present.
    path: str = MISSING
    task: EvalTask = EvalTask.zeroshot  # what is measured on the dataset
    metric: EvalMetric = EvalMetric.top1  # classification headline
    split: str = "test"  # subdirectory evaluated when it exists, else the directory itself
    train_split: str = "train"  # linear probe: subdirectory the classifier is fit on
    # Built-in set (imagenet) or a file, one name per line; default: classnames.txt beside the data,
    # else the ImageFolder's directory names.
    classnames: Optional[str] = None
    # Built-in set (openai_imagenet, simple_imagenet, simple) or a file with one `{}` template per line;
    # default: templates.txt / zeroshot_classification_templates.txt beside the data, else openai_imagenet.
    templates: Optional[str] = None


@dataclass
class LinearProbeConfig:
    """Logistic regression on frozen, L2-normalised image features (CLIP / ELEVATER protocol)."""

    reg: List[float] = field(default_factory=lambda: [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0])  # L2 strengths swept
    val_fraction: float = fraction(0.2)  # share of the train split held out to choose the L2 strength
    test_fraction: float = fraction(0.5)  # a dataset with no train split is split in two, this share tested
    max_iter: int = positive(500)  # L-BFGS iterations per fit


@dataclass
class EvalConfig:
    suite: str = "none"  # the suite's name (each configs/eval/*.yaml sets its own)
    root: str = "${work_dir}/eval_data"  # where suite configs look for their datasets
    # name -> dataset section (eval.datasets.<name>.path, task, ...); set by the suite
    datasets: Dict[str, EvalDatasetConfig] = field(default_factory=dict)
    every_n_steps: int = non_negative(0)  # periodic eval during distillation; 0 = off
    periodic_tasks: List[EvalTask] = field(  # tasks run during training
        default_factory=lambda: [EvalTask.zeroshot, EvalTask.retrieval])
    batch_size: int = positive(256)  # images per forward
    workers: int = non_negative(2)  # image decoding processes per rank
    precision: PrecisionName = PrecisionName.auto  # auto: fp16 on GPU, fp32 on CPU
    probe: LinearProbeConfig = field(default_factory=LinearProbeConfig)
    # `python -m dime_ds.eval model=... [teacher=...]`: a dime_ds run or checkpoint directory, an
    # exported OpenCLIP directory, local-dir:/hf-hub:, or an OpenCLIP architecture with eval.pretrained.
    model: Optional[str] = None
    pretrained: Optional[str] = None  # pretrained tag or weights file for eval.model given as an architecture name
    # auto: the run's own teacher when eval.model is a dime_ds checkpoint | none | a model as above.
    teacher: Optional[str] = "auto"
    teacher_pretrained: Optional[str] = None  # the same for eval.teacher
    out_dir: Optional[str] = None  # reports; null: <run dir>/eval for a checkpoint, else ${work_dir}/eval


@dataclass
class SlurmConfig:
    """What a cluster job asks SLURM for (`python -m dime_ds.launch`; its flags override these). Generic
    defaults here; an experiment sets its own job (vitb32_from_vitl14: the paper's 8 nodes x 8 GPUs),
    which slurm/*.sh's #SBATCH lines must equal. The warning signal, the requeue and the stopped exit
    status are not knobs: dime_ds/jobs.py holds them."""

    nodes: int = positive(1)
    gpus_per_node: int = non_negative(8)
    cpus_per_task: int = 10
    mem_gb: int = 0  # 0 = all memory of the node
    time_min: int = 4320
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    job_dir: str = "${work_dir}/jobs"
    # Requeues in a row without progress (no newer checkpoint) before the job ends instead
    # (dime_ds/jobs.py, RequeueBudget); progress resets the count. 0: never requeue.
    max_requeues: int = non_negative(3)


@dataclass
class RootConfig:
    name: str = "dime_ds"  # run name: the run directory and TensorBoard's label
    work_dir: str = "work"  # embeddings, grounded corpus, runs (and the demo's world); relative paths are made absolute
    run_dir: str = "${work_dir}/runs/${name}"  # checkpoints, TensorBoard, config.yaml, eval reports of this run
    seed: int = 0  # seeds the student's initialisation, data order, augmentation and sampling
    device: Device = Device.auto  # where models run
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    log: LogConfig = field(default_factory=LogConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    match: MatchConfig = field(default_factory=MatchConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


SCHEMA_GROUP = "schema"  # configs/config.yaml picks `library`; the demo's configs pick `demo` (config/demo_schema.py)
