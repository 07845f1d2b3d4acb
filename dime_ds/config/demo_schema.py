"""The demo's own config sections, outside the library's RootConfig: the synthetic world
(`data.root`, `data.synthetic`) and what `make study` compares (`demo.compare`). A config selects
this schema through the `schema` group (`schema: demo`); configs/data/synthetic.yaml and
configs/eval/synthetic.yaml do, so every demo experiment and test on the synthetic world gets it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from dime_ds.config.schema import Choice, DataConfig, RootConfig, fraction, positive


@dataclass
class SyntheticConfig:
    """The synthetic world written by `python -m dime_ds.demo.synthetic` (demo and tests)."""

    seed: int = 0
    image_size: int = positive(64)
    n_images: int = 4000  # unpaired images (distillation)
    n_texts: int = 12000  # text corpus: describing sentences plus distractors
    describing_fraction: float = fraction(0.25)  # share of the corpus that describes some unpaired image
    n_paired: int = 8000  # image-caption pairs (demo teacher, from-scratch baseline)
    n_eval: int = 600  # images per labelled evaluation set
    shard_size: int = positive(1000)  # samples per tar shard
    second_object_p: float = fraction(0.3)
    # Head-heavy corpus (MetaCLIP demo): describing sentences pick their image with replacement so that
    # shape k (SHAPES order) is described with weight (k + 1) ** -head_skew; 0: one sentence per
    # distinct image, uniform (the default world).
    head_skew: float = 0.0
    # Near-duplicates (CLIP-CID demo): this share of unpaired images re-renders another image's scene
    # with fresh noise and jitter; world.json lists them.
    duplicate_fraction: float = 0.0


@dataclass
class DemoDataConfig(DataConfig):
    root: str = "${work_dir}/synthetic"  # where the synthetic world lives
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


class DemoComparison(Choice):
    """dime_ds/demo/comparisons.py holds each one."""

    curation = "curation"  # the MetaCLIP-curated sentence pool
    balance = "balance"  # CLIP-CID's semantic balance of the images
    cid = "cid"  # CLIP-CID's cluster and instance terms on the balanced pool (implies balance)
    views = "views"  # the teacher cached as one plain view (no augmentation) and as 4 augmented views
    families = "families"  # a second student family: a MobileNet-style timm tower beside the ViT
    ensemble = "ensemble"  # a second teacher (another seed): students of A, of B and of the ensemble A+B


@dataclass
class DemoConfig:
    """What `make study` (`python -m dime_ds.demo.study`) trains and compares beside the demo's DIME-FM
    student and the from-scratch yardstick (`make demo` runs those two alone)."""

    compare: List[DemoComparison] = field(default_factory=lambda: list(DemoComparison))


@dataclass
class DemoRootConfig(RootConfig):
    data: DemoDataConfig = field(default_factory=DemoDataConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
