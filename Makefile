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

# $(call GRPO_TABLE,TASK,TABLE,VARIANTS[,VARIANTS]): a table of bench.grpo_ablations for TASK (t2i, edit) on the
# base, reward models and CLI-curated prompts of the chain above; one runner of one thread per variant list (two
# side by side when a second list is given), sharing the file.
GRPO_TABLE = set -eo pipefail; \
	$(REWARD_CHAIN); \
	$(if $(filter edit,$(1)),$(EDIT_PROMPTS),$(T2I_PROMPTS)); \
	run="$(PY) -m bench.grpo_ablations --table $(2) --task $(1) --base $$base --reward-model $$rm \
		--prompts $(if $(filter edit,$(1)),$$pe,$$pt) --threads 1 --output $@"; \
	$$run --variants $(3) & first=$$!; \
	$(if $(4),$$run --variants $(4) & second=$$!;) \
	wait $$first$(if $(4),; wait $$second)

# $(call ARTIFACT_OF,TABLE_FILE,VARIANT): prints the grpo artifact a T2I table of bench.grpo_ablations holds for VARIANT.
ARTIFACT_OF = $(PY) -c 'import json, sys; print(json.load(open(sys.argv[1]))["t2i"]["variants"][sys.argv[2]]["artifact"])' \
	$(1) $(2)

# $(call T2I_CURVE,TABLE,VARIANT,TABLE_FILE,FLAGS): one long T2I variant of bench.grpo_ablations on the chain
# above (FLAGS: e.g. --threads 1), then bench.grpo_curve judging the base and each of its checkpoints ($@, PNG beside).
T2I_CURVE = set -eo pipefail; \
	$(REWARD_CHAIN); \
	$(T2I_PROMPTS); \
	$(PY) -m bench.grpo_ablations --table $(1) --task t2i --base $$base --reward-model $$rm --prompts $$pt \
		$(4) --output $(3); \
	run=$$($(call ARTIFACT_OF,$(3),$(2))); \
	$(PY) -m bench.grpo_curve --run $$run --base $$base --output $@

.PHONY: venv run test test-gpu gpu-check base bench images package clean results/base_shapes.json results/reward_model_shapes.json \
	results/grpo_shapes.json results/opd_shapes.json results/bench_shapes.json results/reliability.json results/rerun_shapes.json \
	results/edit_reward_probe.json results/grpo_ablations.json results/grpo_levers.json results/grpo_epochs.json \
	results/grpo_edit_levers.json results/grpo_curve.json results/t2i_reward_probe.json results/grpo_windows.json \
	results/grpo_ema.json results/grpo_hold_fidelity.json results/grpo_kl_long_curve.json results/grpo_edit_window.json \
	results/grpo_kl03_levers.json results/grpo_cast_rm.json results/fidelity_probe.json results/grpo_trainable.json \
	results/grpo_trainable_long.json results/opd_levers.json results/planner_validation.json

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
test: venv
	$(PY) -m pytest -m "not gpu" -q -n $(TEST_WORKERS) --dist worksteal

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

# The committed measurement of the reward models (results/reward_model_shapes.json):
# base and annotations are reused from artifacts/ when they are already there.
results/reward_model_shapes.json: venv
	base=$$($(VENV)/bin/flowrl base --config configs/shapes.yaml --no-progress | tail -1) && \
	annotations=$$($(VENV)/bin/flowrl annotate --config configs/shapes.yaml --base $$base | tail -1) && \
	$(VENV)/bin/flowrl reward-model --config configs/shapes.yaml --annotations $$annotations --results $@

# The committed GRPO measurement (results/grpo_shapes.json, one key per task); upstream stages are
# reused from artifacts/ when they are already there.
results/grpo_shapes.json: venv
	set -eo pipefail; \
	$(REWARD_CHAIN); \
	for task in t2i edit; do \
		prompts=$$($(FLOWRL) filter-prompts $(SHAPES) --task $$task --base $$base --reward-model $$rm | tail -1); \
		$(FLOWRL) grpo $(SHAPES) --task $$task --base $$base --reward-model $$rm --prompts $$prompts \
			--results $@ --results-key $$task; \
	done

# The GRPO ablation table (results/grpo_ablations.json; T2I, 60 iterations per variant, everything else
# as configs/shapes.yaml): base, reward models and curated prompts come from the same CLI calls as
# results/grpo_shapes.json (reused from artifacts/); two runners of one thread each share the file.
results/grpo_ablations.json: venv
	set -eo pipefail; \
	$(REWARD_CHAIN); \
	$(T2I_PROMPTS); \
	run="$(PY) -m bench.grpo_ablations --task t2i --base $$base --reward-model $$rm --prompts $$pt --threads 1 \
		--set iterations=60 --set eval_every=20 --output $@"; \
	$$run --variants cfg_hybrid cfg_both & first=$$!; \
	$$run --variants cfg_none timesteps_all & second=$$!; \
	wait $$first; wait $$second

# The prompt-distribution levers of GRPO (results/grpo_levers.json; T2I, 200 iterations per variant):
# same base, reward models and CLI-curated prompts as above; variants that change `filter` keys
# filter again themselves. Two runners of one thread each share the file.
results/grpo_levers.json: venv
	$(call GRPO_TABLE,t2i,levers,default,category_filter_balanced_unsaturated_2steps)

# PPO epochs on top of the levers (results/grpo_epochs.json; T2I, 200 iterations per variant): same
# base, reward models and CLI-curated prompts as above; two runners of one thread each share the file.
results/grpo_epochs.json: venv
	$(call GRPO_TABLE,t2i,epochs,levers_2epochs,levers_4epochs)

# The same levers on edits (results/grpo_edit_levers.json; 200 iterations per variant): same base, reward
# models and CLI-curated edit prompts as above; the default-config arm is results/grpo_shapes.json's edit teacher.
results/grpo_edit_levers.json: venv
	$(call GRPO_TABLE,edit,edit_levers,kind_filter_balanced_2steps,kind_filter_balanced_2steps_hard_kinds)

# Gain over time (results/grpo_long.json, then results/grpo_curve.json and .png): the T2I levers for 800
# iterations on all threads, then the judge on the full held-out sets at the base and every checkpoint.
results/grpo_curve.json: venv
	$(call T2I_CURVE,long,levers_800,results/grpo_long.json,)

# Which steps of the schedule GRPO trains, and the group size (results/grpo_windows.json; the T2I levers for
# 400 iterations per variant): same base, reward models and CLI-curated prompts as above; two runners of one
# thread each share the file.
results/grpo_windows.json: venv
	$(call GRPO_TABLE,t2i,windows,first_half first_30pct second_half,whole_schedule first_half_group16)

# The first 30 % window with EMA weights, at the levers' lr and at twice it (results/grpo_ema.json): same chain
# as above; two runners of one thread each share the file.
results/grpo_ema.json: venv
	$(call GRPO_TABLE,t2i,ema,first_30pct_ema95,first_30pct_ema95_lr2e4)

# Holding fidelity at the first 30 % window's gain: KL 0.3, fidelity weight 1.0, and under KL 0.3 noise level 1.0
# (results/grpo_hold_fidelity.json): same chain as above; two runners of one thread each share the file.
results/grpo_hold_fidelity.json: venv
	$(call GRPO_TABLE,t2i,hold_fidelity,first_30pct_kl03 first_30pct_kl03_noise1,first_30pct_fidelity1)

# Past 400 iterations under KL 0.3 (results/grpo_kl_long.json, then results/grpo_kl_long_curve.json and .png): the
# first 30 % window with KL 0.3 for 800 iterations on one thread (as the windows table), then the judge at the base
# and every 100-iteration checkpoint.
results/grpo_kl_long_curve.json: venv
	$(call T2I_CURVE,kl_long,first_30pct_kl03_800,results/grpo_kl_long.json,--threads 1)

# The edit levers with the best T2I window and KL 0.3, 400 iterations (results/grpo_edit_window.json): same chain
# as above, CLI-curated edit prompts, one thread.
results/grpo_edit_window.json: venv
	$(call GRPO_TABLE,edit,edit_window,kind_levers_first_30pct_kl03)

# The first 30 % window with KL 0.3 and per-category advantage calibration (results/grpo_kl03_levers.json): same
# chain as above, one thread.
results/grpo_kl03_levers.json: venv
	$(call GRPO_TABLE,t2i,kl03_levers,first_30pct_kl03_calibrate)

# The first 30 % window with KL 0.3 and with KL 0.1 on reward models whose annotation data also held off-palette
# colour casts (results/grpo_cast_rm.json): the same base; annotate, reward-model and filter-prompts run with the
# --set below (new versions of those stages); two runners of one thread each share the file.
CAST_SET := --set 'annotate.degradations=[noise, blur, blotches, color_cast]'
results/grpo_cast_rm.json: SHAPES += $(CAST_SET)
results/grpo_cast_rm.json: venv
	$(call GRPO_TABLE,t2i,cast_rm,first_30pct_kl03,first_30pct)

# Which weights GRPO may move (results/grpo_trainable.json): the first 30 % window training only the blocks'
# attention (KL 0.3), only their attention and MLPs (KL 0.1), and those at twice the lr or with no KL; same chain
# as above, two runners of one thread each share the file.
results/grpo_trainable.json: venv
	$(call GRPO_TABLE,t2i,trainable,first_30pct_kl03_attention first_30pct_kl01_blocks_lr2e4,first_30pct_kl01_blocks \
		first_30pct_nokl_blocks)

# The trainable subsets past 400 iterations (results/grpo_trainable_long.json, then one curve per variant,
# results/grpo_trainable_long_{blocks,attention}_curve.json and .png): the blocks' attention and MLPs, and the
# attention alone, at lr 2e-4 under KL 0.1 for 600 iterations, two runners of one thread side by side; then the judge
# at the base and every 100-iteration checkpoint of each.
results/grpo_trainable_long.json: venv
	$(call GRPO_TABLE,t2i,trainable_long,first_30pct_kl01_blocks_lr2e4_600,first_30pct_kl01_attention_lr2e4_600); \
	pids=; for part in blocks attention; do \
		run=$$($(call ARTIFACT_OF,$@,first_30pct_kl01_$${part}_lr2e4_600)); \
		$(PY) -m bench.grpo_curve --run $$run --base $$base --output results/grpo_trainable_long_$${part}_curve.json & \
		pids="$$pids $$!"; \
	done; for pid in $$pids; do wait $$pid; done

# Which judge fault the KL 0.3 long run drifts into, and whether the shipped and the colour-cast reward models rank
# it (results/fidelity_probe.json): the base and that run's checkpoints at 100, 400 and 800 iterations, read from
# results/grpo_kl_long.json (make it first).
results/fidelity_probe.json: venv
	set -eo pipefail; \
	$(REWARD_CHAIN); \
	ann=$$($(FLOWRL) annotate $(SHAPES) $(CAST_SET) --base $$base | tail -1); \
	cast=$$($(FLOWRL) reward-model $(SHAPES) $(CAST_SET) --annotations $$ann | tail -1); \
	run=$$($(call ARTIFACT_OF,results/grpo_kl_long.json,first_30pct_kl03_800)); \
	ckpt=$$(dirname $$run).checkpoints/$$(basename $$run); \
	$(PY) -m bench.fidelity_probe --base $$base --reward-model shipped=$$rm --reward-model cast=$$cast \
		--policy kl03_it100=$$ckpt-0000100 --policy kl03_it400=$$ckpt-0000400 --policy kl03_it800=$$ckpt-0000800 \
		--threads 1 --output $@

# Does the T2I reward rank the right samples of a base group first, per category (results/t2i_reward_probe.json)?
results/t2i_reward_probe.json: venv
	set -eo pipefail; \
	$(REWARD_CHAIN); \
	$(PY) -m bench.t2i_reward_probe --base $$base --reward-model $$rm --output $@

# Every stage of the shapes run through the CLI (each reused from artifacts/ when complete); leaves
# `models` holding the six --model NAME=URI flags of the compared models.
TEACHERS = $(REWARD_CHAIN); \
	$(T2I_PROMPTS); \
	$(EDIT_PROMPTS); \
	tt=$$($(FLOWRL) grpo $(SHAPES) --task t2i --base $$base --reward-model $$rm --prompts $$pt | tail -1); \
	te=$$($(FLOWRL) grpo $(SHAPES) --task edit --base $$base --reward-model $$rm --prompts $$pe | tail -1)
ALL_MODELS = $(TEACHERS); \
	teachers="--teacher t2i_teacher=$$tt --teacher edit_teacher=$$te --prompts t2i=$$pt edit=$$pe"; \
	on=$$($(FLOWRL) opd $(SHAPES) --base $$base $$teachers | tail -1); \
	off=$$($(FLOWRL) opd $(SHAPES) --base $$base $$teachers --states off_policy | tail -1); \
	mix=$$($(FLOWRL) grpo $(SHAPES) --task mixed --base $$base --reward-model $$rm --prompts t2i=$$pt edit=$$pe | tail -1); \
	models="--model base=$$base --model t2i_teacher=$$tt --model edit_teacher=$$te --model mix_rl=$$mix \
		--model student=$$on --model student_offpolicy=$$off"

# The committed OPD comparison (results/opd_shapes.json): every upstream stage is reused from
# artifacts/ when it is already there; then OPD (on- and off-policy), Mix-RL, and the judge on all six models.
results/opd_shapes.json: venv
	set -eo pipefail; \
	$(ALL_MODELS); \
	$(FLOWRL) judge --config configs/shapes.yaml --results $@ $$models

# The committed bench (results/bench_shapes.json, results/report.md and its PNGs) of a full `make run`:
# the pipeline runs (reusing what artifacts/ already holds), then the same stages through the CLI, all
# reused, give the URIs, and `flowrl bench` on the pipeline's models reuses its bench artifact.
results/bench_shapes.json: venv
	$(MAKE) run CONFIG=configs/shapes.yaml
	set -eo pipefail; \
	$(ALL_MODELS); \
	$(FLOWRL) bench $(SHAPES) $$models --results $@ --report-dir results

# OPD's cost against what the student keeps (results/opd_levers.json): the opd section with K = 4 matched states
# (shipped until 2026-12-05), the student's rollouts with 10 ODE steps, K = 2 (shipped now), and both, one after the other at 2 threads (the
# machine of issue 6's 8-minute budget; run it with nothing else running), on the teachers of the chain in artifacts/;
# then the variant the config ships (match_2states) once more through `pyflyte run ... opd_stage`, the OPD task in
# its Elastic worker; and Mix-RL on the same chain (`mix_rl`: the stage's metrics, with the judge on both tasks).
results/opd_levers.json: venv
	set -eo pipefail; \
	$(TEACHERS); \
	run="$(PY) -m bench.opd_levers --base $$base --teacher t2i_teacher=$$tt --teacher edit_teacher=$$te \
		--prompts t2i=$$pt edit=$$pe --threads 2 --output $@"; \
	$$run; \
	$$run --pipeline match_2states; \
	$(FLOWRL) grpo $(SHAPES) --task mixed --base $$base --reward-model $$rm --prompts t2i=$$pt edit=$$pe \
		--results $@ --results-key mix_rl

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

# The edit reward on held-out instruction texts: ideal output vs no-op (results/edit_reward_probe.json);
# the reward-model artifact is reused from artifacts/ when it is already there.
results/edit_reward_probe.json: venv
	set -eo pipefail; \
	$(REWARD_CHAIN); \
	$(PY) -m bench.edit_reward_probe --reward-model $$rm --output $@

# The committed reliability record (results/reliability.json): every fault-injection test and every
# bad-input case, with what passed.
results/reliability.json: venv
	$(PY) -m pytest -q -m "fault or bad_input" -n $(TEST_WORKERS) --dist worksteal --reliability-report=$@

# Benchmarks: measure and write results/*.json (they assert nothing).
bench: venv
	$(PY) -m bench.reward_server --output results/reward_server_bench.json
	$(PY) -m bench.grpo --output results/grpo_bench.json
	$(PY) -m bench.rerun --output results/rerun_bench.json
