# Which judge fault the KL 0.3 long run drifts into, and whether the shipped and the colour-cast reward models rank
# it (experiments/fidelity_probe/README.md), included by the top-level Makefile after
# experiments/grpo_ablations/study.mk (CAST_SET, ARTIFACT_OF, GA_OUT).
FIDELITY_PROBE := experiments/fidelity_probe/results/fidelity_probe.json
.PHONY: $(FIDELITY_PROBE)

# fidelity_probe.json: the base and that run's checkpoints at 100, 400 and 800 iterations, read from
# experiments/grpo_ablations/results/grpo_kl_long.json (make it first).
$(FIDELITY_PROBE): venv
	set -eo pipefail; \
	$(REWARD_CHAIN); \
	ann=$$($(FLOWRL) annotate $(SHAPES) $(CAST_SET) --base $$base | tail -1); \
	cast=$$($(FLOWRL) reward-model $(SHAPES) $(CAST_SET) --annotations $$ann | tail -1); \
	run=$$($(call ARTIFACT_OF,$(GA_OUT)/grpo_kl_long.json,first_30pct_kl03_800)); \
	ckpt=$$(dirname $$run).checkpoints/$$(basename $$run); \
	$(PY) -m experiments.fidelity_probe.fidelity_probe --base $$base --reward-model shipped=$$rm \
		--reward-model cast=$$cast \
		--policy kl03_it100=$$ckpt-0000100 --policy kl03_it400=$$ckpt-0000400 --policy kl03_it800=$$ckpt-0000800 \
		--threads 1 --output $@
