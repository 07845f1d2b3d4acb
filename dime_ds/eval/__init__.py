"""Evaluation: zero-shot classification (retrieval and linear probe to come)."""
