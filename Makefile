# Two commands a newcomer needs (see README):
#   make debug   fine-tune the embedded tiny model on synthetic data (CPU is fine)
#   make test    run every test tier that this machine can run
# Both create .venv and install what is missing on first use.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Without a GPU we install the CPU build of torch; a plain `torch` requirement would pull a multi-GB CUDA build.
TORCH_SPEC ?= $(shell if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo torch; else echo torch==2.13.0; fi)

.PHONY: venv debug test test-fast clean slurm-deps

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q --no-build-isolation "deepspeed>=0.17,<0.20"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

debug: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/train/debug/finetune.sh

test: $(STAMP) slurm-deps
	$(VENV)/bin/python -m pytest

# The slurm tests start a local Slurm cluster: as root with apt-get this installs Debian's slurm and munge when missing;
# otherwise (or if apt-get fails, which it reports) it does nothing and those tests skip with the reason.
slurm-deps:
	@bash scripts/install_slurm_deps.sh

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -m "not integration and not multiprocess and not slurm"

clean:
	rm -rf $(VENV) output
