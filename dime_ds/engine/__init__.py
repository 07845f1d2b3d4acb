"""Training machinery: schedules, train loops, checkpoints. The only package that imports deepspeed."""
