# Two commands a newcomer needs (see README):
#   make debug   fine-tune the embedded tiny model on synthetic data (CPU is fine)
#   make test    run every test tier that this machine can run
# Both create .venv and install what is missing on first use.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Without a GPU we install the CPU build of torch; a plain `torch` requirement would pull a multi-GB CUDA build.
TORCH_SPEC ?= $(shell if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo torch; else echo torch==2.13.0; fi)

.PHONY: venv debug test test-fast clean slurm-deps gpu-check gpu-wheels

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

# One command for a short GPU loan (benchmarks/gpu_check.py): installs what the GPU image lacks from .whl/, runs the
# gpu tests and the throughput matrix, writes gpu_check.json/.md to $(OUT) (or output/gpu-check). On the GPU machine it
# uses its own python3 (the one with CUDA torch) unless this checkout has a venv. DRY_RUN=1: the same on CPU, tiny model.
GPU_CHECK_OUT ?= $(if $(OUT),$(OUT),output/gpu-check)
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check: $(if $(DRY_RUN),$(STAMP))
	$(if $(DRY_RUN),$(PY),$(GPU_PY)) benchmarks/gpu_check.py --out $(GPU_CHECK_OUT) $(if $(DRY_RUN),--dry_run)

# Here, ahead of a GPU loan: wheels of what the GPU image lacks, at this venv's tested versions (carry .whl there).
gpu-wheels: $(STAMP)
	$(PY) benchmarks/gpu_check.py --prepare_wheels .whl

clean:
	rm -rf $(VENV) output
