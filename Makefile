VENV ?= .venv
# DALI build: cuda120 (CUDA 12 drivers) or cuda130 (CUDA 13), e.g. `make install DALI=cuda130`. Both wheels install
# the same `nvidia.dali` package, so a venv holds one; switching replaces it.
DALI ?= cuda120
DALI_PACKAGES := nvidia-dali-cuda120 nvidia-dali-cuda130
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install test demo lint clean-runs

install: $(VENV)/.installed $(VENV)/.dali-$(DALI)

$(VENV)/.installed: pyproject.toml requirements.txt constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -c constraints.txt -r requirements.txt nvidia-dali-$(DALI)
	$(PIP) install -q -c constraints.txt --no-build-isolation deepspeed
	$(PIP) install -q --no-deps facenet-pytorch==2.6.0
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $@
	rm -f $(VENV)/.dali-* && touch $(VENV)/.dali-$(DALI)

$(VENV)/.dali-$(DALI): $(VENV)/.installed
	$(PIP) uninstall -q -y $(filter-out nvidia-dali-$(DALI),$(DALI_PACKAGES))
	$(PIP) install -q -c constraints.txt nvidia-dali-$(DALI)
	rm -f $(VENV)/.dali-* && touch $@

test: install
	$(PY) -m pytest -q -x --timeout=900 tests

lint: install
	$(VENV)/bin/ruff check .

# The main job on a fresh machine: sample dataset -> shards -> 2-rank tiny-cpu training -> evaluation report.
# Resumable; the last line printed is the path of the report.json (see scripts/demo.sh for its knobs).
demo: install
	@VENV=$(VENV) bash scripts/demo.sh
