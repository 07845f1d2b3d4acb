"""CLIP-CID's terms as a part of the DIME-FM objective: the pseudo-labels of the cluster stage (looked
up by image key, so live and cached teachers read the same), this rank's centre slice (fixed teacher
centroids, or a learnable parameter the engine trains), the step counter the negative sampling draws
from, and the weighted terms added to DIME-FM's total. Math: losses/cid.py."""
from __future__ import annotations

import torch
from torch import nn

from dime_ds.config import ConfigError
from dime_ds.config.schema import ClusterConfig, LossConfig
from dime_ds.data.pseudo_labels import PseudoLabelError, PseudoLabels
from dime_ds.losses.cid import cluster_loss, instance_loss, shard_bounds
from dime_ds.objectives.base import RunContext

CENTRES = "centres"  # the feature that carries learnable centres through the student step


class LearnedCentres(nn.Module):
    """All k centres, replicated on every rank like any data-parallel parameter: rank r scores only its
    slice, so its gradient is zero elsewhere and the engine's average over ranks is exact."""

    def __init__(self, centroids: torch.Tensor):
        super().__init__()
        self.centres = nn.Parameter(centroids.clone())


class CidTerms:
    def __init__(self, loss_cfg: LossConfig, cluster_cfg: ClusterConfig, teacher_dim: int, ctx: RunContext):
        self.cfg, self.ctx, self.step = loss_cfg, ctx, 0
        self.labels: PseudoLabels | None = None
        self.learned: LearnedCentres | None = None
        self.fixed: torch.Tensor | None = None
        if loss_cfg.w_cluster > 0:
            try:
                self.labels = PseudoLabels(cluster_cfg.out_dir)
            except PseudoLabelError as err:
                raise ConfigError(f"loss.w_cluster={loss_cfg.w_cluster} needs the cluster stage's pseudo-labels "
                                  f"in cluster.out_dir={cluster_cfg.out_dir}: {err}") from None
            centroids = torch.from_numpy(self.labels.centroids)
            if centroids.shape[1] != teacher_dim:
                raise ConfigError(f"cluster.out_dir={cluster_cfg.out_dir}: centroids are {centroids.shape[1]}-d, the "
                                  f"teacher embeds in {teacher_dim}-d: cluster this teacher's embeddings")
            self.k = centroids.shape[0]
            if loss_cfg.learn_centres:
                self.learned = LearnedCentres(centroids)
            else:  # fixed: this rank keeps its slice only
                lo, hi = shard_bounds(self.k, ctx.world.rank, ctx.world.world_size)
                self.fixed = centroids[lo:hi].to(ctx.device)

    def batch_labels(self, keys) -> dict:
        """Targets entries for a micro-batch of image keys (concatenated like every target)."""
        if self.labels is None:
            return {}
        return {"cluster_label": torch.from_numpy(self.labels.lookup(list(keys))).to(self.ctx.device)}

    def student_features(self) -> dict:
        """The learnable centre slice as a feature: accumulation differentiates the loss with respect to
        features only, then carries their gradient into the parameter on each re-forward."""
        if self.learned is None:
            return {}
        lo, hi = shard_bounds(self.k, self.ctx.world.rank, self.ctx.world.world_size)
        return {CENTRES: self.learned.centres[lo:hi].float()}

    def add_terms(self, losses: dict, s_img: torch.Tensor, t_img: torch.Tensor, features: dict,
                  targets: dict) -> dict:
        """DIME-FM's losses plus `cluster` and `instance` (those with weight > 0), their weighted sum
        added to `total`. One call per optimizer step: the step counter seeds the negative sampling."""
        cfg, out = self.cfg, dict(losses)
        if cfg.w_cluster > 0:
            centres = features[CENTRES] if self.learned is not None else self.fixed
            out["cluster"] = cluster_loss(s_img, centres, targets["cluster_label"], k=self.k, scale=cfg.cluster_scale,
                                          margin=cfg.cluster_margin, sample_rate=cfg.cluster_sample_rate,
                                          seed=self.ctx.seed, step=self.step)
            out["total"] = out["total"] + cfg.w_cluster * out["cluster"]
        if cfg.w_instance > 0:
            out["instance"] = instance_loss(s_img, t_img, temperature=cfg.instance_temperature)
            out["total"] = out["total"] + cfg.w_instance * out["instance"]
        self.step += 1
        return out
