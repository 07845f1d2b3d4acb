"""The embed stage: the teacher turns image and sentence shards into fp16 embedding shards (the
grounding stage's input and the distillation engine's teacher cache)."""
