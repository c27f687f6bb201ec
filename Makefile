# Two commands do everything on a fresh machine:
#   make demo   - create .venv, install, run the end-to-end job on the built-in corpus
#   make test   - create .venv if needed, install (with the dev, ref and beam extras), lint, run the tests
# Both are idempotent: a second run reuses .venv and reinstalls only when setup.py changed.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: demo test test-slow test-all install clean-demo lint

$(PY):
	$(PYTHON) -m venv $(VENV)

# tools/install.py installs with uv under pip's configuration (falling back to pip): the same
# versions, in about a fifth of pip's time.
$(STAMP): setup.py Makefile tools/install.py | $(PY)
	$(PY) tools/install.py -e '.[dev,ref,beam]'
	# The FID parity reference: pytorch-fid and a torchvision that imports beside torch 2.13 CPU
	# (only its layer definitions are used); --no-deps keeps the installer from replacing torch.
	$(PY) tools/install.py --no-deps pytorch-fid==0.3.0 torchvision==0.16.2
	touch $(STAMP)

install: $(STAMP)

# DEMO_DIR goes into a gin string literal: a quote in it would end the literal.
demo: $(STAMP)
	$(if $(findstring ',$(DEMO_DIR))$(findstring ",$(DEMO_DIR)),$(error DEMO_DIR=$(DEMO_DIR) holds a quote; choose a folder name without quotes))
	$(PY) -m cm3leon_jax.main --gin_file=gin_configs/runs/demo.gin --gin.MODEL_DIR="'$(DEMO_DIR)'"

lint: $(STAMP)
	$(PY) -m ruff check .

# The default run leaves out tests marked slow; `make test-slow` runs only those. Two workers,
# one test file each at a time (module fixtures and compiled functions stay shared in a file),
# the longest files first (tests/conftest.py, RUN_FIRST).
test: $(STAMP) lint
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m "not slow" $(PYTEST_ARGS) tests

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS) tests

test-all: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

# Only a demo's folder (it holds stages/), and in it only what a demo writes (the clear that
# --gin.demo.start_over=True does, its config files, then the folder if nothing else is left).
# demo/stages.py is imported alone: the demo package imports every stage's libraries (seconds).
clean-demo:
	@test ! -e "$(DEMO_DIR)" || test -d "$(DEMO_DIR)/stages" || \
		{ echo "$(DEMO_DIR) holds no demo run (no stages/): not deleting it" >&2; exit 1; }
	@test ! -e "$(DEMO_DIR)" || $(PY) -c 'import sys; sys.path.insert(0, "cm3leon_jax/demo"); \
		import stages; stages.clean(sys.argv[1])' "$(DEMO_DIR)"
