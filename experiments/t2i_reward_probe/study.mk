# Does the T2I reward rank the right samples of a base group first, per category
# (experiments/t2i_reward_probe/README.md)? Included by the top-level Makefile (REWARD_CHAIN, PY come from there).
T2I_REWARD_PROBE := experiments/t2i_reward_probe/results/t2i_reward_probe.json
.PHONY: $(T2I_REWARD_PROBE)

$(T2I_REWARD_PROBE): venv
	set -eo pipefail; \
	$(REWARD_CHAIN); \
	$(PY) -m experiments.t2i_reward_probe.t2i_reward_probe --base $$base --reward-model $$rm --output $@
