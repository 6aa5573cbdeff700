# The two commands of the README. Each sets up .venv/ first (idempotent).
PY := .venv/bin/python

.PHONY: env test
env:
	bash tools/setup_env.sh

test: env
	$(PY) -m pytest -q tests
