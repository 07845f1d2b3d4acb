"""Losses. functional.py: pure math on whole tensors (no collectives); dime.py: the
distributed version that gathers features across ranks, then calls functional; cid.py: CLIP-CID's
cluster term over centres sharded across ranks (and its instance term)."""
