# Two commands on a fresh machine:
#   make demo   installs everything into ./.venv and runs the embedded default job
#   make test   runs the full test suite (installing first if needed)
# and, for the edit-test loop, make test-fast: the suite without the tests marked slow
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast gpu-wheels gpu-check gpu-check-smoke

setup: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -c requirements.txt setuptools wheel ninja torch torchvision
	MMCV_WITH_OPS=1 $(PIP) install --no-build-isolation -c requirements.txt mmcv
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps -r requirements-nodeps.txt
	$(PY) -c "import cv2, numpy, panopticapi.evaluation; assert int(numpy.__version__.split('.')[0]) >= 2"
# the checkout runs in place; only the CUDA extension is built into it (when a toolkit and a GPU are there)
	$(PY) setup.py --quiet build_ext --inplace
	touch $(STAMP)

demo: setup
	$(PY) -m classification.train --cfg configs/classification/demo.yaml
	$(PY) -m classification.train --cfg configs/classification/demo.yaml --eval --resume output/demo/best.pth

test: setup
	$(PY) -m pytest tests

test-fast: setup
	$(PY) -m pytest -m "not slow" tests

# The GPU check (tools/gpu_check.py, docs/benchmarks.md): every GPU path built, tested and timed in minutes. It runs
# with this environment where it exists, else with $(PYTHON) and that interpreter's own torch: on a GPU machine
# without registry access, after `make gpu-wheels` here and gpu-wheels/ copied along. Report: gpu-check/ or
# $$GPU_CHECK_OUT.
CHECK_PY = $(if $(wildcard $(PY)),$(PY),$(PYTHON))

gpu-wheels:
	PYTHON=$(CHECK_PY) tools/gpu_wheels.sh

gpu-check:
	$(CHECK_PY) tools/gpu_check.py

gpu-check-smoke: setup
	$(PY) tools/gpu_check.py --smoke
