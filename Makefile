# flowrl: `make run` runs the pipeline on the shapes world, `make test` the tests.
# Both create or refresh .venv from the pinned requirements first.
SHELL := bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/shapes.yaml
FLOWRL := $(VENV)/bin/flowrl
SHAPES := --config configs/shapes.yaml --output artifacts --no-progress
# The CPU wheel of torch; GPU images install a CUDA build instead (images/).
TORCH_SPEC ?= torch==2.13.0

# The shapes chain through the CLI, each stage reused from artifacts/ when complete: REWARD_CHAIN
# leaves `base`, `ann` and `rm` holding the base, annotations and reward-model URIs; T2I_PROMPTS and
# EDIT_PROMPTS (after it) leave `pt` / `pe` holding a task's curated prompts.
REWARD_CHAIN = base=$$($(FLOWRL) base $(SHAPES) | tail -1); \
	ann=$$($(FLOWRL) annotate $(SHAPES) --base $$base | tail -1); \
	rm=$$($(FLOWRL) reward-model $(SHAPES) --annotations $$ann | tail -1)
T2I_PROMPTS = pt=$$($(FLOWRL) filter-prompts $(SHAPES) --task t2i --base $$base --reward-model $$rm | tail -1)
EDIT_PROMPTS = pe=$$($(FLOWRL) filter-prompts $(SHAPES) --task edit --base $$base --reward-model $$rm | tail -1)

.PHONY: venv browser run test test-gpu gpu-check base bench images package clean experiments-test results-check \
	results/base_shapes.json results/reward_model_shapes.json results/grpo_shapes.json results/opd_shapes.json \
	results/bench_shapes.json results/reliability.json results/rerun_shapes.json results/planner_validation.json \
	results/perf.json

$(STAMP): requirements/cpu.txt requirements/gpu.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "make: $(PYTHON) not found (set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements/cpu.txt
	# DeepSpeed (ZeRO for GRPO / OPD; its CPU accelerator runs the tests): the sdist's build imports torch
	$(PY) -m pip install -q --no-build-isolation -r requirements/gpu.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

# The whole workflow, locally; it ends by printing where the bench report is.
run: venv
	set -o pipefail; $(VENV)/bin/pyflyte run pipelines/post_train.py post_train --config $(CONFIG) 2>&1 | tee .run.log
	@echo "bench report: $$(grep -o "[^\"' =]*/bench/[0-9a-f]*/report.html" .run.log | tail -1)"

# The suite runs on TEST_WORKERS pytest-xdist workers (0: in this process; auto: one per core), each test going
# to whichever worker is free. Most tests keep one core busy: on 2 cores, 454 s with two workers against 649 s
# in one process (2026-12-04, one run each).
TEST_WORKERS ?= 2
test: venv browser
	$(PY) -m pytest -m "not gpu" -q -n $(TEST_WORKERS) --dist worksteal

# A test opens report.html in a real headless browser: Debian's chromium, installed with apt-get (as root, or
# through sudo) when no chromium, chromium-browser or google-chrome is on PATH; nothing to do when one is.
BROWSERS := chromium chromium-browser google-chrome
browser:
	@for b in $(BROWSERS); do command -v $$b >/dev/null && exit 0; done; \
	command -v apt-get >/dev/null || { echo "make: no headless browser ($(BROWSERS)) and no apt-get:" \
		"install chromium yourself"; exit 1; }; \
	sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	echo "make: installing Debian's chromium for the report test ($${sudo:+sudo }apt-get install chromium)"; \
	$$sudo apt-get update -qq && $$sudo apt-get install -y -qq chromium >/dev/null

test-gpu: venv
	$(PY) -m pytest -m gpu -q

# On a GPU machine, at most 8 minutes: the tiny production path on CUDA in bfloat16, and the memory check
# (results/gpu_check.json; bench/gpu_check.py, `--device cpu` to try it here; its CUDA memory meter is not built).
gpu-check: venv
	$(PY) -m bench.gpu_check --output results/gpu_check.json

base: venv
	$(VENV)/bin/flowrl base --config $(CONFIG) --output artifacts

# Container images (images/, docs/images.md): built with the docker SDK and tagged by their contents,
# under PACKAGE_CONFIG's launch.registry (the names `make package` bakes into the tasks) or REGISTRY=host/org;
# DRY_RUN=1 prints the builds, PUSH=1 pushes them.
images: venv
	$(PY) images/build.py $(if $(REGISTRY),--registry $(REGISTRY),--config $(PACKAGE_CONFIG)) $(if $(DRY_RUN),--dry-run) \
		$(if $(PUSH),--push)

# The remote bundle, offline (no model hub): every task launched as CONFIG's `launch` section says (images
# under launch.registry, tagged by their contents; worker processes, nodes, resources, secrets), GRPO and OPD
# memory from the planner. PACKAGE_CONFIG defaults to the production scenario.
PACKAGE_CONFIG ?= configs/qwen_image.yaml
PACKAGE_OUTPUT ?= flyte-package.tgz
package: venv
	$(PY) -m tasks.package --config $(PACKAGE_CONFIG) --output $(PACKAGE_OUTPUT)

clean:
	-$(VENV)/bin/pyflyte local-cache clear
	rm -rf artifacts mlflow.db mlartifacts .pytest_cache .run.log flyte-package.tgz

# The committed measurement of the base stage (results/base_shapes.json).
results/base_shapes.json: venv
	$(VENV)/bin/flowrl base --config configs/shapes.yaml --results $@

# The committed measurement of the reward models (results/reward_model_shapes.json): `round1`, trained on the
# first annotation round, which filters the prompts and scores GRPO round 1; `refreshed`, those models refreshed on
# both rounds, which score GRPO round 2, OPD's teachers and the bench. Every stage is reused from artifacts/
# when it is complete there (after a `make run`, nothing is trained).
results/reward_model_shapes.json: venv
	set -eo pipefail; rm -f $@; \
	$(TEACHERS); \
	$(FLOWRL) reward-model $(SHAPES) --annotations $$ann1 --results $@ --results-key round1; \
	$(FLOWRL) reward-model $(SHAPES) --annotations $$ann --init $$rm1 --results $@ --results-key refreshed

# The committed GRPO measurement (results/grpo_shapes.json, one key per task: the teachers, which with
# configs/shapes.yaml's two annotation rounds are the round-2 runs); upstream stages are reused from artifacts/.
results/grpo_shapes.json: venv
	set -eo pipefail; \
	$(TEACHERS); \
	$(FLOWRL) grpo $(SHAPES) --task t2i --base $$base --reward-model $$rm --prompts $$pt --round 2 --init $$t1 \
		--results $@ --results-key t2i; \
	$(FLOWRL) grpo $(SHAPES) --task edit --base $$base --reward-model $$rm --prompts $$pe --round 2 --init $$e1 \
		--results $@ --results-key edit

# Every stage of the shapes run through the CLI (each reused from artifacts/ when complete), as the workflow
# runs it with configs/shapes.yaml's pipeline.annotation_rounds: 2: GRPO round 1 on the first reward models,
# the second annotation round on its samples, the refreshed reward models (`rm` from then on), GRPO round 2.
# TEACHERS leaves `tt` / `te` holding the teachers (`t1` / `e1` their first rounds, `ann1` / `rm1` the first
# round's annotations and reward models); DEFAULT_MODELS leaves
# `models` holding the --model NAME=URI flags of the default run's four models, ALL_MODELS those of all six
# (with the Mix-RL baseline and off-policy OPD, which the default run leaves out).
TEACHERS = $(REWARD_CHAIN); \
	$(T2I_PROMPTS); \
	$(EDIT_PROMPTS); \
	ann1=$$ann; rm1=$$rm; \
	t1=$$($(FLOWRL) grpo $(SHAPES) --task t2i --base $$base --reward-model $$rm --prompts $$pt --round 1 | tail -1); \
	e1=$$($(FLOWRL) grpo $(SHAPES) --task edit --base $$base --reward-model $$rm --prompts $$pe --round 1 | tail -1); \
	ann=$$($(FLOWRL) annotate $(SHAPES) --base $$base --previous $$ann1 --policies t2i=$$t1 edit=$$e1 | tail -1); \
	rm=$$($(FLOWRL) reward-model $(SHAPES) --annotations $$ann --init $$rm1 | tail -1); \
	tt=$$($(FLOWRL) grpo $(SHAPES) --task t2i --base $$base --reward-model $$rm --prompts $$pt --round 2 \
		--init $$t1 | tail -1); \
	te=$$($(FLOWRL) grpo $(SHAPES) --task edit --base $$base --reward-model $$rm --prompts $$pe --round 2 \
		--init $$e1 | tail -1)
DEFAULT_MODELS = $(TEACHERS); \
	teachers="--teacher t2i_teacher=$$tt --teacher edit_teacher=$$te --prompts t2i=$$pt edit=$$pe"; \
	on=$$($(FLOWRL) opd $(SHAPES) --base $$base $$teachers | tail -1); \
	models="--model base=$$base --model t2i_teacher=$$tt --model edit_teacher=$$te --model student=$$on"
ALL_MODELS = $(DEFAULT_MODELS); \
	off=$$($(FLOWRL) opd $(SHAPES) --base $$base $$teachers --states off_policy | tail -1); \
	mix=$$($(FLOWRL) grpo $(SHAPES) --task mixed --base $$base --reward-model $$rm --prompts t2i=$$pt edit=$$pe | tail -1); \
	models="$$models --model mix_rl=$$mix --model student_offpolicy=$$off"

# The committed OPD measurement (results/opd_shapes.json): the judge on the held-out sets of the default run's four
# models (base, both teachers, the OPD student), every stage reused from artifacts/ when complete there. Mix-RL and
# off-policy OPD are the study experiments/mixrl_vs_student (ALL_MODELS).
results/opd_shapes.json: venv
	set -eo pipefail; \
	$(DEFAULT_MODELS); \
	$(FLOWRL) judge --config configs/shapes.yaml --results $@ $$models

# The committed bench (results/bench_shapes.json, results/report.md and its PNGs) of a full `make run`:
# the pipeline runs (reusing what artifacts/ already holds), then the same stages through the CLI, all
# reused, give the URIs, and `flowrl bench` on the pipeline's models reuses its bench artifact.
results/bench_shapes.json: venv
	$(MAKE) run CONFIG=configs/shapes.yaml
	set -eo pipefail; \
	$(DEFAULT_MODELS); \
	$(FLOWRL) bench $(SHAPES) $$models --results $@ --report-dir results

# The memory planner against measured memory (results/planner_validation.json): for each memory mode (LoRA as
# configs/qwen_image.yaml ships it, LoRA under DDP, ZeRO-2, ZeRO-3 with gradient checkpointing) and stage (GRPO,
# OPD), two gloo processes on the CPU run two iterations with checkpoints of a real-width Qwen-Image transformer
# block; each rank's peak resident memory against flowrl.planner's estimate (docs/memory.md). About 30 minutes;
# up to 10 GiB per process, one pair at a time.
results/planner_validation.json: venv
	$(PY) -m bench.planner_validation --output $@

# A second `make run` of the shapes config with nothing changed, timed, with the stages that ran
# (results/rerun_shapes.json); run it right after a `make run` of that config has completed.
results/rerun_shapes.json: venv
	$(PY) -m bench.rerun --in-place --config configs/shapes.yaml --output $@

# The committed reliability record (results/reliability.json): every fault-injection test and every
# bad-input case, with what passed.
results/reliability.json: venv
	$(PY) -m pytest -q -m "fault or bad_input" -n $(TEST_WORKERS) --dist worksteal --reliability-report=$@

# The studies beside the product (experiments/<study>/: script, study.mk, results, README.md): each results file is a
# target of its study.mk, e.g. `make experiments/grpo_ablations/results/grpo_levers.json` (fidelity_probe's recipe
# uses CAST_SET and ARTIFACT_OF of grpo_ablations' fragment).
STUDIES := grpo_ablations opd_levers fidelity_probe t2i_reward_probe edit_reward_probe refactor_parity algorithms \
	mixrl_vs_student reward_data_scaling
include $(foreach s,$(STUDIES),experiments/$(s)/study.mk)

# The checks of the studies' committed results (experiments/*/test_results.py; not part of `make test`).
experiments-test: venv
	$(PY) -m pytest -q $(foreach s,$(STUDIES),experiments/$(s))

# Whether the committed product results (results/*.json) still match configs/shapes.yaml; after a change of a default
# they are stale until re-measured by their make target (not part of `make test`, which checks only their form).
results-check: venv
	$(PY) -m pytest -q results/test_fresh.py

# Benchmarks: measure and write results/*.json (they assert nothing).
bench: venv
	$(PY) -m bench.reward_server --output results/reward_server_bench.json
	$(PY) -m bench.grpo --output results/grpo_bench.json
	$(PY) -m bench.rerun --output results/rerun_bench.json
	$(PY) -m bench.perf --output results/perf.json

# Every part of results/perf.json (bench/perf.py): the micro ratios `make bench` writes, a cold and a cached run of
# the shapes pipeline in a scratch directory (stage times, peak memory) and the test suite's time. About an hour on
# 2 cores; run it on a quiet machine, since other work skews every time it records.
results/perf.json: venv
	$(PY) -m bench.perf --output $@ --parts micro,run,tests --config configs/shapes.yaml --test-workers $(TEST_WORKERS)
