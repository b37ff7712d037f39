# The edit reward on held-out instruction texts: ideal output vs no-op (experiments/edit_reward_probe/README.md);
# the reward-model artifact is reused from artifacts/ when it is already there. Included by the top-level Makefile.
EDIT_REWARD_PROBE := experiments/edit_reward_probe/results/edit_reward_probe.json
.PHONY: $(EDIT_REWARD_PROBE)

$(EDIT_REWARD_PROBE): venv
	set -eo pipefail; \
	$(REWARD_CHAIN); \
	$(PY) -m experiments.edit_reward_probe.edit_reward_probe --reward-model $$rm --output $@
