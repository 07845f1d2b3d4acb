"""Distributed plumbing: the only package that reads rank variables (env.py) or calls
torch.distributed (collectives.py). stage.py runs a stage on every rank (process group, agreed
errors, results gathered to or sent from rank 0); import it as `dime_ds.distributed.stage`.
Everything is the identity in a single process."""
from dime_ds.distributed.collectives import (all_gather_object, all_reduce_mean, all_reduce_sum, barrier,
                                      broadcast_object, gather_no_grad, gather_with_grad, is_distributed, is_main, rank,
                                      world_size)
from dime_ds.distributed.env import (WorldInfo, backend_for, device_for, expand_nodelist, free_port,
                              init_distributed, shutdown, world_info)

__all__ = ["WorldInfo", "all_gather_object", "all_reduce_mean", "all_reduce_sum", "backend_for", "barrier",
           "broadcast_object", "device_for", "expand_nodelist", "free_port", "gather_no_grad", "gather_with_grad",
           "init_distributed", "is_distributed", "is_main", "rank", "shutdown", "world_info", "world_size"]
