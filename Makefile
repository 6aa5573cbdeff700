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
