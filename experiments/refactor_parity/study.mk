# Whether a refactor changed any result (experiments/refactor_parity/README.md), included by the top-level Makefile
# (PY comes from there). PARITY_REF: the commit to compare this checkout against.
PARITY_REF ?= 418fb81
PARITY := experiments/refactor_parity/results/parity.json
.PHONY: $(PARITY)

# parity.json: the smoke pipeline at PARITY_REF and in this checkout, one after the other on this machine; every
# stage's final metrics (timings and artifact locations left out) and the sha256 of its trained weights.
$(PARITY): venv
	$(PY) -m experiments.refactor_parity.parity --ref $(PARITY_REF) --output $@
