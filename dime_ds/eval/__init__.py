"""Evaluation: zero-shot classification, image-text retrieval, linear probe; suites as configs;
`python -m dime_ds.eval` compares models side by side."""
