"""The embedded default, apart from the library it demonstrates: the synthetic world, the demo
teacher's CLIP pretraining, and `python -m dime_ds.demo` (the whole pipeline on one CPU machine)."""
