# Two commands on a fresh machine:
#   make demo   installs classification's dependencies into ./.venv and trains the demo (minutes, no OpenMMLab)
#   make test   installs the rest (deployment runtimes and test tools, then the OpenMMLab stack) and runs the suite
# and, for the edit-test loop, make test-fast: the suite without the tests marked slow. Each install step is one
# target, in this order:
#   setup         requirements.txt: PyTorch, timm and the rest of classification (training, evaluation, the demo)
#   setup-extras  requirements-extras.txt: ONNX, OpenVINO, ExecuTorch, the WebDataset and Hugging Face readers, pytest
#   setup-dense   requirements-dense.txt: mmcv compiled from source, MMEngine, MMDetection, MMSegmentation (detection
#                 and segmentation; the longest step, 8 to 26 minutes on 2 cores, then cached by pip)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST := $(PY) -m pytest --numprocesses auto --dist loadgroup --durations=15

.PHONY: setup setup-extras setup-dense demo test test-fast gpu-wheels gpu-check gpu-check-smoke

setup: $(VENV)/.setup
setup-extras: $(VENV)/.setup-extras
setup-dense: $(VENV)/.setup-dense

$(VENV)/.setup: requirements.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -r requirements.txt
# the checkout runs in place; only the CUDA extension is built into it (when a toolkit and a GPU are there)
	$(PY) setup.py --quiet build_ext --inplace
	touch $@

$(VENV)/.setup-extras: $(VENV)/.setup requirements-extras.txt
	$(PIP) install -c requirements.txt -r requirements-extras.txt
	touch $@

$(VENV)/.setup-dense: $(VENV)/.setup requirements-dense.txt requirements-nodeps.txt
	MMCV_WITH_OPS=1 $(PIP) install --no-build-isolation -c requirements.txt -c requirements-dense.txt mmcv
	$(PIP) install -c requirements.txt -r requirements-dense.txt
	$(PIP) install --no-deps -r requirements-nodeps.txt
	$(PY) -c "import cv2, numpy, panopticapi.evaluation; assert int(numpy.__version__.split('.')[0]) >= 2"
	touch $@

demo: setup
	$(PY) -m classification.train --cfg configs/classification/demo.yaml
	$(PY) -m classification.train --cfg configs/classification/demo.yaml --eval --resume output/demo/best.pth

test: setup setup-extras setup-dense
	$(PYTEST) tests

# the fast tier needs no OpenMMLab build: its detection and segmentation tests run where the stack is installed
test-fast: setup setup-extras
	$(PYTEST) -m "not slow" tests

# The GPU check (tools/gpu_check.py, docs/benchmarks.md): every GPU path built, tested and timed in minutes. It runs
# with this environment where it exists, else with $(PYTHON) and that interpreter's own torch: on a GPU machine
# without registry access, after `make gpu-wheels` here and gpu-wheels/ copied along. Report: gpu-check/ or
# $$GPU_CHECK_OUT.
CHECK_PY = $(if $(wildcard $(PY)),$(PY),$(PYTHON))

gpu-wheels:
	PYTHON=$(CHECK_PY) tools/gpu_wheels.sh

gpu-check:
	$(CHECK_PY) tools/gpu_check.py

gpu-check-smoke: setup setup-extras
	$(PY) tools/gpu_check.py --smoke
