VENV ?= .venv
# DALI build: auto (the CUDA major torch's wheel is built for: `python -m ltm.env --dali-build auto`), or cuda120
# (CUDA 12 drivers) / cuda130 (CUDA 13), e.g. `make install DALI=cuda120` on nodes whose driver predates CUDA 13.
# Both wheels install the same `nvidia.dali` package, so a venv holds one; switching replaces it. `ltm env` shows
# what is installed and whether it fits the driver.
DALI ?= auto
DALI_PACKAGES := nvidia-dali-cuda120 nvidia-dali-cuda130
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# the resolved build only: the other one is removed first (both would own `nvidia.dali`)
INSTALL_DALI = build=$$($(PY) -m ltm.env --dali-build $(DALI)) && \
	for package in $(DALI_PACKAGES); do [ $$package = nvidia-dali-$$build ] || $(PIP) uninstall -q -y $$package; done && \
	$(PIP) install -q -c constraints.txt nvidia-dali-$$build

.PHONY: install test demo lint clean-runs

install: $(VENV)/.installed $(VENV)/.dali-$(DALI)

$(VENV)/.installed: pyproject.toml requirements.txt constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -c constraints.txt -r requirements.txt
	$(INSTALL_DALI)
	$(PIP) install -q -c constraints.txt --no-build-isolation deepspeed
	$(PIP) install -q --no-deps facenet-pytorch==2.6.0
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $@
	rm -f $(VENV)/.dali-* && touch $(VENV)/.dali-$(DALI)

$(VENV)/.dali-$(DALI): $(VENV)/.installed
	$(INSTALL_DALI)
	rm -f $(VENV)/.dali-* && touch $@

test: install
	$(PY) -m pytest -q -x --timeout=900 tests

lint: install
	$(VENV)/bin/ruff check .

# The main job on a fresh machine: sample dataset -> shards -> 2-rank tiny-cpu training -> evaluation report.
# Resumable; the last line printed is the path of the report.json (see scripts/demo.sh for its knobs).
demo: install
	@VENV=$(VENV) bash scripts/demo.sh
