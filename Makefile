# Two commands on a fresh machine:
#   make demo   installs everything into ./.venv and runs the embedded default job
#   make test   runs the full test suite (installing first if needed)
# and, for the edit-test loop, make test-fast: the suite without the tests marked slow
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast

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
