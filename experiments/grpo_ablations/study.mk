# GRPO ablation tables and gain-over-time curves (experiments/grpo_ablations/README.md), included by the top-level
# Makefile: it defines REWARD_CHAIN, T2I_PROMPTS, EDIT_PROMPTS, SHAPES, FLOWRL and PY. Every file lands in GA_OUT.
GA_OUT := experiments/grpo_ablations/results
GA := experiments.grpo_ablations

# $(call GRPO_TABLE,TASK,TABLE,VARIANTS[,VARIANTS]): a table of grpo_ablations for TASK (t2i, edit) on the
# base, reward models and CLI-curated prompts of the chain; one runner of one thread per variant list (two
# side by side when a second list is given), sharing the file.
GRPO_TABLE = set -eo pipefail; \
	$(REWARD_CHAIN); \
	$(if $(filter edit,$(1)),$(EDIT_PROMPTS),$(T2I_PROMPTS)); \
	run="$(PY) -m $(GA).grpo_ablations --table $(2) --task $(1) --base $$base --reward-model $$rm \
		--prompts $(if $(filter edit,$(1)),$$pe,$$pt) --threads 1 --output $@"; \
	$$run --variants $(3) & first=$$!; \
	$(if $(4),$$run --variants $(4) & second=$$!;) \
	wait $$first$(if $(4),; wait $$second)

# $(call ARTIFACT_OF,TABLE_FILE,VARIANT): prints the grpo artifact a T2I table of grpo_ablations holds for VARIANT.
ARTIFACT_OF = $(PY) -c 'import json, sys; print(json.load(open(sys.argv[1]))["t2i"]["variants"][sys.argv[2]]["artifact"])' \
	$(1) $(2)

# $(call T2I_CURVE,TABLE,VARIANT,TABLE_FILE,FLAGS): one long T2I variant of grpo_ablations on the chain
# (FLAGS: e.g. --threads 1), then grpo_curve judging the base and each of its checkpoints ($@, PNG beside).
T2I_CURVE = set -eo pipefail; \
	$(REWARD_CHAIN); \
	$(T2I_PROMPTS); \
	$(PY) -m $(GA).grpo_ablations --table $(1) --task t2i --base $$base --reward-model $$rm --prompts $$pt \
		$(4) --output $(3); \
	run=$$($(call ARTIFACT_OF,$(3),$(2))); \
	$(PY) -m $(GA).grpo_curve --run $$run --base $$base --output $@

# Colour casts in the annotation data (grpo_cast_rm.json here, experiments/fidelity_probe).
CAST_SET := --set 'annotate.degradations=[noise, blur, blotches, color_cast]'

GA_TARGETS := $(addprefix $(GA_OUT)/,grpo_ablations.json grpo_levers.json grpo_epochs.json grpo_edit_levers.json \
	grpo_curve.json grpo_windows.json grpo_ema.json grpo_hold_fidelity.json grpo_kl_long_curve.json \
	grpo_edit_window.json grpo_kl03_levers.json grpo_cast_rm.json grpo_trainable.json grpo_trainable_long.json)
.PHONY: $(GA_TARGETS)

# The GRPO ablation table (grpo_ablations.json; T2I, 60 iterations per variant, everything else
# as configs/shapes.yaml): base, reward models and curated prompts come from the same CLI calls as
# results/grpo_shapes.json (reused from artifacts/); two runners of one thread each share the file.
$(GA_OUT)/grpo_ablations.json: venv
	set -eo pipefail; \
	$(REWARD_CHAIN); \
	$(T2I_PROMPTS); \
	run="$(PY) -m $(GA).grpo_ablations --task t2i --base $$base --reward-model $$rm --prompts $$pt --threads 1 \
		--set iterations=60 --set eval_every=20 --output $@"; \
	$$run --variants cfg_hybrid cfg_both & first=$$!; \
	$$run --variants cfg_none timesteps_all & second=$$!; \
	wait $$first; wait $$second

# The prompt-distribution levers of GRPO (grpo_levers.json; T2I, 200 iterations per variant):
# same base, reward models and CLI-curated prompts as above; variants that change `filter` keys
# filter again themselves. Two runners of one thread each share the file.
$(GA_OUT)/grpo_levers.json: venv
	$(call GRPO_TABLE,t2i,levers,default,category_filter_balanced_unsaturated_2steps)

# PPO epochs on top of the levers (grpo_epochs.json; T2I, 200 iterations per variant): same
# base, reward models and CLI-curated prompts as above; two runners of one thread each share the file.
$(GA_OUT)/grpo_epochs.json: venv
	$(call GRPO_TABLE,t2i,epochs,levers_2epochs,levers_4epochs)

# The same levers on edits (grpo_edit_levers.json; 200 iterations per variant): same base, reward
# models and CLI-curated edit prompts as above; the default-config arm is results/grpo_shapes.json's edit teacher.
$(GA_OUT)/grpo_edit_levers.json: venv
	$(call GRPO_TABLE,edit,edit_levers,kind_filter_balanced_2steps,kind_filter_balanced_2steps_hard_kinds)

# Gain over time (grpo_long.json, then grpo_curve.json and .png): the T2I levers for 800
# iterations on all threads, then the judge on the full held-out sets at the base and every checkpoint.
$(GA_OUT)/grpo_curve.json: venv
	$(call T2I_CURVE,long,levers_800,$(GA_OUT)/grpo_long.json,)

# Which steps of the schedule GRPO trains, and the group size (grpo_windows.json; the T2I levers for
# 400 iterations per variant): same base, reward models and CLI-curated prompts as above; two runners of one
# thread each share the file.
$(GA_OUT)/grpo_windows.json: venv
	$(call GRPO_TABLE,t2i,windows,first_half first_30pct second_half,whole_schedule first_half_group16)

# The first 30 % window with EMA weights, at the levers' lr and at twice it (grpo_ema.json): same chain
# as above; two runners of one thread each share the file.
$(GA_OUT)/grpo_ema.json: venv
	$(call GRPO_TABLE,t2i,ema,first_30pct_ema95,first_30pct_ema95_lr2e4)

# Holding fidelity at the first 30 % window's gain: KL 0.3, fidelity weight 1.0, and under KL 0.3 noise level 1.0
# (grpo_hold_fidelity.json): same chain as above; two runners of one thread each share the file.
$(GA_OUT)/grpo_hold_fidelity.json: venv
	$(call GRPO_TABLE,t2i,hold_fidelity,first_30pct_kl03 first_30pct_kl03_noise1,first_30pct_fidelity1)

# Past 400 iterations under KL 0.3 (grpo_kl_long.json, then grpo_kl_long_curve.json and .png): the
# first 30 % window with KL 0.3 for 800 iterations on one thread (as the windows table), then the judge at the base
# and every 100-iteration checkpoint.
$(GA_OUT)/grpo_kl_long_curve.json: venv
	$(call T2I_CURVE,kl_long,first_30pct_kl03_800,$(GA_OUT)/grpo_kl_long.json,--threads 1)

# The edit levers with the best T2I window and KL 0.3, 400 iterations (grpo_edit_window.json): same chain
# as above, CLI-curated edit prompts, one thread.
$(GA_OUT)/grpo_edit_window.json: venv
	$(call GRPO_TABLE,edit,edit_window,kind_levers_first_30pct_kl03)

# The first 30 % window with KL 0.3 and per-category advantage calibration (grpo_kl03_levers.json): same
# chain as above, one thread.
$(GA_OUT)/grpo_kl03_levers.json: venv
	$(call GRPO_TABLE,t2i,kl03_levers,first_30pct_kl03_calibrate)

# The first 30 % window with KL 0.3 and with KL 0.1 on reward models whose annotation data also held off-palette
# colour casts (grpo_cast_rm.json): the same base; annotate, reward-model and filter-prompts run with
# CAST_SET (new versions of those stages); two runners of one thread each share the file.
$(GA_OUT)/grpo_cast_rm.json: SHAPES += $(CAST_SET)
$(GA_OUT)/grpo_cast_rm.json: venv
	$(call GRPO_TABLE,t2i,cast_rm,first_30pct_kl03,first_30pct)

# Which weights GRPO may move (grpo_trainable.json): the first 30 % window training only the blocks'
# attention (KL 0.3), only their attention and MLPs (KL 0.1), and those at twice the lr or with no KL; same chain
# as above, two runners of one thread each share the file.
$(GA_OUT)/grpo_trainable.json: venv
	$(call GRPO_TABLE,t2i,trainable,first_30pct_kl03_attention first_30pct_kl01_blocks_lr2e4,first_30pct_kl01_blocks \
		first_30pct_nokl_blocks)

# The trainable subsets past 400 iterations (grpo_trainable_long.json, then one curve per variant,
# grpo_trainable_long_{blocks,attention}_curve.json and .png): the blocks' attention and MLPs, and the
# attention alone, at lr 2e-4 under KL 0.1 for 600 iterations, two runners of one thread side by side; then the judge
# at the base and every 100-iteration checkpoint of each.
$(GA_OUT)/grpo_trainable_long.json: venv
	$(call GRPO_TABLE,t2i,trainable_long,first_30pct_kl01_blocks_lr2e4_600,first_30pct_kl01_attention_lr2e4_600); \
	pids=; for part in blocks attention; do \
		run=$$($(call ARTIFACT_OF,$@,first_30pct_kl01_$${part}_lr2e4_600)); \
		$(PY) -m $(GA).grpo_curve --run $$run --base $$base --output $(GA_OUT)/grpo_trainable_long_$${part}_curve.json & \
		pids="$$pids $$!"; \
	done; for pid in $$pids; do wait $$pid; done
