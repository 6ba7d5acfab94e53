# The README's commands: `make demo` (main job), `make test` (the whole suite), `make lab` (the app).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONHASHSEED := 0

.PHONY: demo test lab setup corpus clean-corpus

demo: setup
	$(PY) -m minicosy demo

test: setup corpus
	$(PY) -m pytest tests notebooks --nbval-lax --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg -p no:cacheprovider

lab: setup corpus
	$(PY) -m minicosy lab

setup: $(VENV)/.minicosy-setup

$(VENV)/.minicosy-setup: pyproject.toml constraints.txt scripts/setup.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/setup.sh
	touch $@

corpus: setup
	$(PY) -m minicosy.data build --if-missing

clean-corpus:
	rm -rf data/corpus
