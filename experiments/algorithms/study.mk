# RL algorithms side by side on one wall-clock budget (experiments/algorithms/README.md), included by the top-level
# Makefile: it defines REWARD_CHAIN, T2I_PROMPTS, EDIT_PROMPTS, SHAPES, FLOWRL and PY.
ALG_RUNS := experiments/algorithms/results/algorithms_runs.json
# seconds of training per variant and task (two runs side by side, one thread each)
ALG_BUDGET ?= 480
.PHONY: results/algorithms_shapes.json

# results/algorithms_shapes.json and .png: every variant of experiments/algorithms/algorithms.py on the base, reward
# models and curated prompts of the chain in artifacts/, T2I then edit, two runners of one thread each side by side
# (so every run sees the same share of the machine), then the summary and its plot.
results/algorithms_shapes.json: venv
	set -eo pipefail; \
	$(REWARD_CHAIN); \
	$(T2I_PROMPTS); \
	$(EDIT_PROMPTS); \
	rm -f $(ALG_RUNS); \
	for task in t2i edit; do \
		if [ $$task = t2i ]; then prompts=$$pt; else prompts=$$pe; fi; \
		run="$(PY) -m experiments.algorithms.algorithms run --task $$task --base $$base --reward-model $$rm \
			--prompts $$prompts --budget-s $(ALG_BUDGET) --output $(ALG_RUNS)"; \
		$$run --variants grpo cps nft & first=$$!; \
		$$run --variants dance_sde mixgrpo grpo_guard & second=$$!; \
		wait $$first; wait $$second; \
	done; \
	$(PY) -m experiments.algorithms.algorithms summarize --runs $(ALG_RUNS) --output $@; \
	rm -f $(ALG_RUNS:.json=.lock)
