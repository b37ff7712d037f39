# OPD's cost against what the student keeps (experiments/opd_levers/README.md), included by the top-level Makefile
# (TEACHERS, SHAPES, FLOWRL and PY come from there).
OPD_LEVERS := experiments/opd_levers/results/opd_levers.json
.PHONY: $(OPD_LEVERS)

# opd_levers.json: the opd section with K = 4 matched states (shipped until 2026-12-05), the student's rollouts with
# 10 ODE steps, K = 2 (shipped now), and both, one after the other at 2 threads (the machine of issue 6's 8-minute
# budget; run it with nothing else running), on the teachers of the chain in artifacts/; then the variant the config
# ships (match_2states) once more through `pyflyte run ... opd_stage`, the OPD task in its Elastic worker; and Mix-RL
# on the same chain (`mix_rl`: the stage's metrics, with the judge on both tasks).
$(OPD_LEVERS): venv
	set -eo pipefail; \
	$(TEACHERS); \
	run="$(PY) -m experiments.opd_levers.opd_levers --base $$base --teacher t2i_teacher=$$tt --teacher edit_teacher=$$te \
		--prompts t2i=$$pt edit=$$pe --threads 2 --output $@"; \
	$$run; \
	$$run --pipeline match_2states; \
	$(FLOWRL) grpo $(SHAPES) --task mixed --base $$base --reward-model $$rm --prompts t2i=$$pt edit=$$pe \
		--results $@ --results-key mix_rl
