# Mix-RL against the OPD student on one budget (experiments/mixrl_vs_student/README.md), included by the top-level
# Makefile: it defines ALL_MODELS, SHAPES, FLOWRL, VENV and PY.
MVS_OUT := experiments/mixrl_vs_student/results
.PHONY: $(MVS_OUT)/mixrl_vs_student.json

# The workflow with both ablation branches on (its other stages are the default run's, reused from artifacts/), the
# same stages through the CLI for the six models' URIs, the bench of all six, and the comparison.
$(MVS_OUT)/mixrl_vs_student.json: venv
	set -eo pipefail; \
	$(PY) -m experiments.mixrl_vs_student.compare config --output $(MVS_OUT)/config.yaml; \
	$(VENV)/bin/pyflyte run pipelines/post_train.py post_train --config $(MVS_OUT)/config.yaml; \
	$(ALL_MODELS); \
	$(FLOWRL) bench $(SHAPES) $$models --results $(MVS_OUT)/bench_all.json --report-dir $(MVS_OUT)/report; \
	$(PY) -m experiments.mixrl_vs_student.compare summarize --bench $(MVS_OUT)/bench_all.json --output $@
