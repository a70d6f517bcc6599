VENV ?= .venv
# DALI build: auto (the CUDA major torch's wheel is built for: `python -m ltm.env --dali-build auto`), or cuda120
# (CUDA 12 drivers) / cuda130 (CUDA 13), e.g. `make install DALI=cuda120` on nodes whose driver predates CUDA 13.
# Both wheels install the same `nvidia.dali` package, so a venv holds one; switching replaces it. `ltm env` shows
# what is installed and whether it fits the driver.
DALI ?= auto
DALI_PACKAGES := nvidia-dali-cuda120 nvidia-dali-cuda130
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# uv (pinned in constraints.txt, installed into the venv by its pip) installs the rest: the same resolution as pip,
# from the sources pip is configured with (scripts/pip_sources.py: uv reads no pip.conf), in about half pip's time
# (parallel downloads, unpacking and bytecode compiling). Bytecode is compiled at install, as pip does: a venv whose
# users set PYTHONDONTWRITEBYTECODE would otherwise compile torch's modules again in every process.
UV_PIP = $(VENV)/bin/uv pip
UV_INSTALL = $(UV_PIP) install -q --python $(PY) --compile-bytecode $$($(PY) scripts/pip_sources.py)
# the resolved build only: the other one is removed first (both would own `nvidia.dali`)
INSTALL_DALI = build=$$($(PY) -m ltm.env --dali-build $(DALI)) && \
	for package in $(DALI_PACKAGES); do [ $$package = nvidia-dali-$$build ] || \
		$(UV_PIP) uninstall -q --python $(PY) $$package; done && \
	$(UV_INSTALL) -c constraints.txt nvidia-dali-$$build

# Air-gapped nodes: `make wheelhouse` (on a machine with network, after `make install`) collects every wheel
# `make install` needs for a target into WHEELHOUSE (scripts/wheelhouse.py; resumable); `make install WHEELS=DIR` on
# the node installs from it alone (DIR/install.sh: checksums, then every pip call --no-index --find-links DIR).
#   PYTHON_VERSION  the node's Python (default: this venv's)      PLATFORM  its platform tag (manylinux_2_28_x86_64)
#   TORCH=no        leave torch out (the node brings its own)       DALI      as for install (auto: this venv's torch's)
#   PART_MB=60      also split into parts of at most 60 MiB (WHEELHOUSE/parts/p1 ... pN)
WHEELHOUSE ?= wheelhouse
PYTHON_VERSION ?=
PLATFORM ?=
TORCH ?= yes
PART_MB ?= 0
WHEELS ?=
ifneq ($(WHEELS),)
# offline: the wheelhouse's installer (in p1/ where the parts were copied as folders), ltm editable from this checkout
INSTALLER = $(firstword $(wildcard $(WHEELS)/install.sh $(WHEELS)/p1/install.sh))
INSTALL_OFFLINE = $(if $(INSTALLER),bash $(INSTALLER) $(WHEELS) --python $(PY) --dali $(DALI) --editable $(CURDIR),\
	{ echo "make install: $(WHEELS) holds no wheelhouse (no install.sh): see make wheelhouse" >&2; exit 1; })
# (the installer puts the DALI build in place: again only for another DALI=)
INSTALL_DALI = test -e $(VENV)/.dali-$(DALI) || $(INSTALL_OFFLINE)
endif

.PHONY: install test demo lint clean-runs wheelhouse

install: $(VENV)/.installed $(VENV)/.dali-$(DALI)

$(VENV)/.installed: pyproject.toml requirements.txt constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
ifneq ($(WHEELS),)
	$(INSTALL_OFFLINE)
else
	$(PIP) install -q -c constraints.txt uv
	$(UV_INSTALL) --upgrade pip
	$(UV_INSTALL) torch==2.14.1 torchvision==0.29.1
	$(UV_INSTALL) -c constraints.txt -r requirements.txt
	$(INSTALL_DALI)
	$(UV_INSTALL) -c constraints.txt --no-build-isolation deepspeed
	$(UV_INSTALL) --no-deps facenet-pytorch==2.6.0
	$(UV_INSTALL) --no-deps --no-build-isolation -e .
endif
	touch $@
	rm -f $(VENV)/.dali-* && touch $(VENV)/.dali-$(DALI)

$(VENV)/.dali-$(DALI): $(VENV)/.installed
	$(INSTALL_DALI)
	rm -f $(VENV)/.dali-* && touch $@

# The suite in two pytest sessions side by side. The local SLURM cluster's tests (marked `slurm` by tests/conftest.py)
# run one after another in their own session: the cluster is one set of daemons on this machine, started once and
# stopped at the end (xdist's --dist loadgroup cannot keep them on one worker: with pytest >= 9.2 its group marks no
# longer reach the scheduler). The rest runs on TEST_WORKERS xdist processes, a test module to a worker (--dist
# loadfile): a module's fixtures (trained runs, a wheelhouse, a server) are then built once, not once per worker its
# tests were spread over. The longest modules go first (tests/conftest.py; --no-loadscope-reorder keeps that order),
# so no long one is left running alone at the end. Much of it waits on subprocesses, daemons and Chromium, so 2 workers pay on 2 cores beside
# the SLURM session. One OpenMP thread per process: the workers and the ranks they start already share the cores.
# Passive OpenMP waits are set by tests/conftest.py, for pytest run alone as well.
# The SLURM session's output follows the other's.
TEST_WORKERS ?= 2
PYTEST = OMP_NUM_THREADS=1 $(PY) -m pytest -q -x --timeout=900
test: install
	@mkdir -p runs
	$(PYTEST) --durations=10 -p no:xdist -m slurm tests > runs/test-slurm.log 2>&1 & slurm=$$!; \
	$(PYTEST) --durations=25 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slurm" tests; rest=$$?; \
	wait $$slurm; status=$$?; echo "== the SLURM cluster's tests (runs/test-slurm.log)"; cat runs/test-slurm.log; \
	exit $$(( rest != 0 || status != 0 ))

wheelhouse: install
	$(PY) scripts/wheelhouse.py build $(WHEELHOUSE) $(if $(PYTHON_VERSION),--python-version $(PYTHON_VERSION)) \
		$(if $(PLATFORM),--platform $(PLATFORM)) --torch $(TORCH) --dali $(DALI) --part-mb $(PART_MB)

lint: install
	$(VENV)/bin/ruff check .

# The main job on a fresh machine: sample dataset -> shards -> 2-rank tiny-cpu training -> evaluation report.
# Resumable; the last line printed is the path of the report.json (see scripts/demo.sh for its knobs).
demo: install
	@VENV=$(VENV) bash scripts/demo.sh
