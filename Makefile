VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install test demo lint clean-runs

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.txt constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -c constraints.txt -r requirements.txt
	$(PIP) install -q -c constraints.txt --no-build-isolation deepspeed
	$(PIP) install -q --no-deps facenet-pytorch==2.6.0
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $@

test: install
	$(PY) -m pytest -q -x --timeout=900 tests

lint: install
	$(VENV)/bin/ruff check .

# The main job on a fresh machine: sample dataset -> shards -> 2-rank tiny-cpu training -> evaluation report.
# Resumable; the last line printed is the path of the report.json (see scripts/demo.sh for its knobs).
demo: install
	@VENV=$(VENV) bash scripts/demo.sh
