"""Reinforcement learning for flow-matching models: GRPO and its parts."""
