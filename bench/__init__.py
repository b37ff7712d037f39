"""Benchmarks of the product (`make bench`, `make gpu-check`, `make results/...`): its speed and memory, each
script writing one results file. Studies (ablations, probes) live in experiments/."""
