"""Losses. functional.py: pure math on whole tensors (no torch.distributed); dime.py: the
distributed version that gathers features across ranks, then calls functional."""
