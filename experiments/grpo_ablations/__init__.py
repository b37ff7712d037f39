"""GRPO ablation tables and their gain-over-time curves (README.md beside this file)."""
