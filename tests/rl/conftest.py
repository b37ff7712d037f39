"""A tiny shapes model for the RL tests, on one thread."""

import torch

from flowrl.config import FlowRLConfig, from_dict
from flowrl.models import create_model
from tests.models.conftest import single_thread  # noqa: F401  (autouse: tiny models on one thread)

TINY = {"model": {"shapes": {"width": 32, "depth": 2, "heads": 2, "head_channels": 4}}}


def tiny_model(seed: int = 0):
    """Non-zero adaLN gates, so the prompt reaches the output."""
    m = create_model(from_dict(FlowRLConfig, TINY), seed=seed)
    with torch.no_grad():
        for block in m.net.blocks:
            torch.nn.init.normal_(block.modulation.bias, std=0.5, generator=torch.Generator().manual_seed(seed))
    return m
