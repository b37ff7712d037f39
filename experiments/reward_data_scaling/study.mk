# Where the reward models stop on unseen prompts, and whether texts or images are what they lack
# (experiments/reward_data_scaling/README.md). Included by the top-level Makefile (REWARD_CHAIN, PY come from there).
# One file per share under results/points/: texts-F.json (a share F of the training texts) and groups-F.json (every
# text, a share F of its groups); whole.json is the default run's own reward models. `make -j2` trains two shares
# side by side, one torch thread each (RDS_THREADS). A point is measured once: delete it to measure it again.
RDS_OUT := experiments/reward_data_scaling/results
RDS := $(PY) -m experiments.reward_data_scaling.reward_data_scaling
RDS_THREADS ?= 1
RDS_SHARES := 0.125 0.25 0.5
RDS_POINTS := $(RDS_OUT)/points/whole.json $(foreach a,texts groups,$(foreach f,$(RDS_SHARES),$(RDS_OUT)/points/$(a)-$(f).json))
.PHONY: $(RDS_OUT)/reward_data_scaling.json rds-chain

# the default run's base, annotations and reward models, made (or found) once before the shares run side by side
rds-chain: | venv
	set -eo pipefail; $(REWARD_CHAIN)

$(RDS_OUT)/points/whole.json: | rds-chain
	set -eo pipefail; \
	$(REWARD_CHAIN); \
	$(RDS) measure --annotations $$ann --reward-model $$rm --threads $(RDS_THREADS) --output $@

$(RDS_OUT)/points/texts-%.json: | rds-chain
	set -eo pipefail; \
	$(REWARD_CHAIN); \
	$(RDS) measure --annotations $$ann --axis texts --fraction $* --threads $(RDS_THREADS) --output $@

$(RDS_OUT)/points/groups-%.json: | rds-chain
	set -eo pipefail; \
	$(REWARD_CHAIN); \
	$(RDS) measure --annotations $$ann --axis groups --fraction $* --threads $(RDS_THREADS) --output $@

$(RDS_OUT)/reward_data_scaling.json: $(RDS_POINTS) | venv
	$(RDS) summarize --points $(RDS_POINTS) --output $@ --figure $(RDS_OUT)/reward_data_scaling.png
