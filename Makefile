# The two commands of the README. Each sets up .venv/ first (idempotent).
PY := .venv/bin/python

.PHONY: env test
env:
	bash tools/setup_env.sh

test: env
	$(PY) -m pytest -q tests

.PHONY: demo
demo: env
	$(PY) tools/make_demo_data.py --out data/shapes
	$(PY) tools/train.py configs/demo/mask_rcnn_mila_demo.py --work-dir work_dirs/demo
	$(PY) tools/demo_report.py work_dirs/demo

# On a CUDA machine with torch and triton (offline is fine): correctness and
# speed of the GPU path, and a Mask R-CNN training and inference step when
# mmcv has its CUDA ops (as `make env` builds it there). It runs in .venv/
# when that exists, else in python3 (PYTHON=... to choose); WHEELS=DIR
# installs missing packages from a folder made by tools/gpu_wheels.sh.
PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
.PHONY: gpu-check
gpu-check:
	$(PYTHON) tools/gpu_check.py work_dirs/gpu_check $(if $(WHEELS),--wheels $(WHEELS))
