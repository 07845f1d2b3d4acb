"""The teacher under ZeRO-3 for inference (`teacher.shard=zero3`): its parameters partitioned across
ranks and gathered per module forward, no optimizer. Built here because only engine/ imports
deepspeed; the teacher source receives it as a plain callable."""
from __future__ import annotations

import deepspeed
from torch import nn

from dime_ds.engine.ds_config import inference_ds_config
from dime_ds.models import Precision


def zero3_inference(module: nn.Module, precision: Precision, micro_batch: int):
    engine, *_ = deepspeed.initialize(model=module, config=inference_ds_config(precision.name, micro_batch))
    engine.eval()
    return engine
