# flowrl: `make run` runs the pipeline on the shapes world, `make test` the tests.
# Both create or refresh .venv from the pinned requirements first.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/shapes.yaml
# The CPU wheel of torch; GPU images install a CUDA build instead (images/).
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv run test test-gpu base bench clean results/base_shapes.json results/reward_model_shapes.json

$(STAMP): requirements/cpu.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "make: $(PYTHON) not found (set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements/cpu.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

run: venv
	$(VENV)/bin/pyflyte run pipelines/post_train.py post_train --config $(CONFIG)

test: venv
	$(PY) -m pytest -m "not gpu" -q

test-gpu: venv
	$(PY) -m pytest -m gpu -q

base: venv
	$(VENV)/bin/flowrl base --config $(CONFIG) --output artifacts

clean:
	rm -rf artifacts mlflow.db mlartifacts .pytest_cache

# The committed measurement of the base stage (results/base_shapes.json).
results/base_shapes.json: venv
	$(VENV)/bin/flowrl base --config configs/shapes.yaml --results $@

# The committed measurement of the reward models (results/reward_model_shapes.json):
# base and annotations are reused from artifacts/ when they are already there.
results/reward_model_shapes.json: venv
	base=$$($(VENV)/bin/flowrl base --config configs/shapes.yaml --no-progress | tail -1) && \
	annotations=$$($(VENV)/bin/flowrl annotate --config configs/shapes.yaml --base $$base | tail -1) && \
	$(VENV)/bin/flowrl reward-model --config configs/shapes.yaml --annotations $$annotations --results $@

# Benchmarks: measure and write results/*.json (they assert nothing).
bench: venv
	$(PY) -m bench.reward_server --output results/reward_server_bench.json
	$(PY) -m bench.grpo --output results/grpo_bench.json
