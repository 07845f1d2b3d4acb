"""Losses. functional.py: pure math on whole tensors (no collectives); dime.py: the
distributed version that gathers features across ranks, then calls functional."""
