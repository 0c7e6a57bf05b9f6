# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The oldest tested torch/diffusers/peft (constraints-oldest.txt), core tests only.
OLD := .venv-oldest
OLD_STAMP := $(OLD)/.installed

.PHONY: demo toy-demo test test-oldest lint bench-quick bench-train-step-gpu docs install clean

# pyiqa (the `eval` extra) pulls ~1.2 GB with its declared dependencies; the weighted metrics
# need only these (see docs/guides/tsdsr-recipe.md, "Using the weighted metrics").
PYIQA_LEAN := pyiqa==0.1.16 opencv-python-headless timm openai-clip ftfy wcwidth 'setuptools>=77.0.3,<82'

# constraints.txt pins the torch build whose wheels are local (pyproject.toml has lower bounds).
$(STAMP): pyproject.toml Makefile constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[train,adam8bit,dev,docs]'
	$(BIN)/pip install -q --no-deps $(PYIQA_LEAN)
	touch $(STAMP)

$(OLD_STAMP): pyproject.toml Makefile constraints-oldest.txt
	test -x $(OLD)/bin/python || $(PYTHON) -m venv $(OLD)
	$(OLD)/bin/pip install -q -c constraints-oldest.txt -e '.[sr,test]'
	touch $(OLD_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m examples.tsdsr.run_tiny

toy-demo: $(STAMP)
	$(BIN)/python examples/gmm_demo.py

lint: $(STAMP)
	$(BIN)/ruff check .

# The benchmarks in quick mode (CPU), their checks asserted and tables printed; results
# go to a temporary folder so the committed GPU tables are not overwritten.
bench-quick: $(STAMP)
	out=$$(mktemp -d) && \
	$(BIN)/python -m benchmarks.train_step --quick --out $$out && \
	$(BIN)/python -m benchmarks.train_step_flux --quick --out $$out && \
	$(BIN)/python -m benchmarks.inference --quick --out $$out && \
	$(BIN)/python -m benchmarks.tiled_vae --quick --out $$out && \
	$(BIN)/python -m benchmarks.sr_throughput --quick --out $$out && \
	$(BIN)/python -m benchmarks.sr_strength --quick --out $$out && \
	$(BIN)/python -m benchmarks.compare_losses --quick --no-docs-assets --out $$out && \
	$(BIN)/python -m benchmarks.natural_patches --quick --no-docs-assets --out $$out

# The library's tests (the core and the SR pipeline; not the recipe's or the benchmarks') on the
# oldest tested versions, in a lean venv without the train extra (the bad-input table drives the
# training CLI).
test-oldest: $(OLD_STAMP)
	$(OLD)/bin/python -m pytest -q -p no:cacheprovider tests --ignore=tests/tsdsr \
		--ignore=tests/benchmarks --ignore=tests/test_bad_inputs.py

# On a GPU machine: the train step on SD3-medium (random weights) against the release's call
# pattern, with and without gradient checkpointing.
bench-train-step-gpu: $(STAMP)
	$(BIN)/python -m benchmarks.train_step --config sd3-medium --device cuda --dtype bf16 --repeats 5
	$(BIN)/python -m benchmarks.train_step --config sd3-medium --device cuda --dtype bf16 --repeats 5 --checkpointing
	$(BIN)/python -m benchmarks.train_step_flux --config flux-dev --device cuda --dtype bf16 --repeats 5 --checkpointing

test: lint bench-quick test-oldest
	$(BIN)/python -m pytest -q

docs: $(STAMP)
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) $(OLD) site outputs .pytest_cache
