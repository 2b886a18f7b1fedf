# Two commands a newcomer needs (see README):
#   make debug   fine-tune the embedded tiny model on synthetic data (CPU is fine)
#   make test    run every test tier that this machine can run
# Both create .venv and install what is missing on first use.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Without a GPU we install the CPU build of torch; a plain `torch` requirement would pull a multi-GB CUDA build.
TORCH_SPEC ?= $(shell if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo torch; else echo torch==2.13.0; fi)

.PHONY: venv lock debug test test-fast clean slurm-deps gpu-check gpu-wheels

venv: $(STAMP)

# Everything but torch comes from a hashed lock, requirements/cpu.txt (made by `make lock` with pip-tools).
# Why pip-tools and not uv: here pip takes the CPU build of torch==2.13.0 from a local file (pip config: find-links
# /opt/wheels, extra index file:///opt/pypi/simple, constraint /etc/xdg/pip/constraints.txt); uv does not read pip's
# config and would download a ~3 GB CUDA torch. torch is kept out of the lock (--unsafe-package torch): the CPU build
# here, the GPU machine's own torch there. deepspeed is an sdist that imports torch while building, hence
# --no-build-isolation (and torch first); --no-deps because the lock already lists every dependency.
PIP_INSTALL := $(PY) -m pip install -q --root-user-action=ignore
$(STAMP): requirements/cpu.txt pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP_INSTALL) "$(TORCH_SPEC)"
	$(PIP_INSTALL) --require-hashes --no-deps --no-build-isolation -r requirements/cpu.txt
	$(PIP_INSTALL) --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $(STAMP)

# Regenerate requirements/cpu.txt and requirements/gpu.txt at the versions installed in LOCK_FROM (the venv the tests
# passed in; trl there is for benchmarks only and stays out). Here: 4-6 min per file with a cold pip cache, 30 s for both warm. Needs pip-tools in LOCK_FROM.
LOCK_FROM ?= $(VENV)
LOCK_TESTED := requirements/.tested-versions.txt
PIP_COMPILE = CUSTOM_COMPILE_COMMAND='make lock' $(LOCK_FROM)/bin/pip-compile -q --generate-hashes --unsafe-package torch --strip-extras \
	--no-emit-find-links --no-emit-index-url -c $(LOCK_TESTED) --extra dev --extra trackers
LOCK_HEADER := "\# LOCK: made by \`make lock\` (pip-tools, not uv: pip here takes the CPU torch==2.13.0 from /opt/wheels via pip's config," \
	"\# LOCK: which uv ignores, downloading a ~3 GB CUDA torch). torch is not in this lock: install it first, then" \
	"\# LOCK: pip install --require-hashes --no-deps --no-build-isolation -r <this file>  (deepspeed is an sdist built against torch)"
lock:
	$(LOCK_FROM)/bin/python -m pip freeze --exclude-editable | grep -v -E '^(trl|pip-tools|build|pyproject-hooks|wheel)==' > $(LOCK_TESTED)
	$(PIP_COMPILE) -o requirements/cpu.txt pyproject.toml
	$(PIP_COMPILE) -o requirements/gpu.txt pyproject.toml requirements/gpu.in
	for f in requirements/cpu.txt requirements/gpu.txt; do { printf '%s\n' $(LOCK_HEADER); grep -v '^# LOCK:' $$f; } > $$f.tmp && mv $$f.tmp $$f; done
	rm -f $(LOCK_TESTED)

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
