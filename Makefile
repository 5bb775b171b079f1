# home-agent: `make demo` and `make test` set everything up themselves (venv, pip, apt packages when root).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUNTIME_STAMP := $(VENV)/.stamp-runtime
TRAIN_STAMP := $(VENV)/.stamp-train
DATA_DIR ?= $(abspath ../shared/data/speech)
export DATA_DIR

.PHONY: setup setup-train demo test test-release lint typecheck bench soak train-kws install uninstall clean

setup: $(RUNTIME_STAMP)

$(RUNTIME_STAMP): pyproject.toml scripts/bootstrap-system.sh
	bash scripts/bootstrap-system.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

setup-train: $(TRAIN_STAMP)

$(TRAIN_STAMP): $(RUNTIME_STAMP)
	bash scripts/bootstrap-system.sh --train
	$(BIN)/python -m pip install -q -e '.[dev,train]'
	touch $@

demo: setup
	$(BIN)/python scripts/demo.py

test: setup-train
	$(BIN)/ruff check agent training tests bench scripts
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

# The wheel a user installs, with no extras, on Python 3.11 and 3.13; install.sh into a scratch root; Pi wheels.
test-release: setup
	$(BIN)/python -m pytest -q -m release

lint: setup
	$(BIN)/ruff check agent training tests bench scripts
	$(BIN)/mypy

bench: setup
	$(BIN)/python -m bench.run_all

soak: setup
	$(BIN)/python bench/soak_bench.py --minutes 60

train-kws: setup-train
	$(BIN)/python -m training.kws --data $(DATA_DIR) --out models/

install:
	bash scripts/install.sh

uninstall:
	bash scripts/install.sh --uninstall

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache
