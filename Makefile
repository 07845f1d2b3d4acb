# The two set-up commands: `make demo` and `make test`. Both create .venv on first use (so does `make study`).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# DeepSpeed JIT-compiles a comm op on first use (about 30 s on 2 cores): the install builds it, and
# it is kept between runs.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions
export PYTHONUNBUFFERED := 1

.PHONY: demo study test venv bench clean-work

demo: $(STAMP)
	$(BIN)/python -m dime_ds.demo $(ARGS)

# The demo's comparisons over student seeds (ARGS="seeds=3 demo.compare=[views]"): dime_ds/demo/study.py
study: $(STAMP)
	$(BIN)/python -m dime_ds.demo.study $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check dime_ds tests bench scripts
	$(BIN)/python -m pytest $(PYTEST_ARGS)

venv: $(STAMP)

# torch/torchvision are pinned to the builds this machine has on disk; a GPU cluster installs
# the same package with the `gpu` extra instead of `cpu` (README.md, "Installing on a cluster").
$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[cpu,dev,deploy]'
	$(BIN)/python -c "$$PREBUILD_DEEPSPEED_OPS"
	touch $@

# The op DeepSpeed's CPU backend builds when a process group starts (deepspeed/comm/torch.py), built
# once here instead of inside the first `make demo`; nothing to build on other accelerators.
define PREBUILD_DEEPSPEED_OPS
from deepspeed.accelerator import get_accelerator
builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
if builder is not None and builder.is_compatible():
    builder.load(verbose=False)
endef
export PREBUILD_DEEPSPEED_OPS

bench: $(STAMP)
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean-work:
	rm -rf work
