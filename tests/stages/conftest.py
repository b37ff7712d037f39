"""Shared smoke-config artifacts of the stage tests: built once per session."""

import pytest
import torch

from flowrl.config import load_config
from flowrl.stages.annotate import run_annotate
from flowrl.stages.base import run_base
from flowrl.stages.filter_prompts import run_filter_prompts
from flowrl.stages.grpo import run_grpo
from flowrl.stages.reward_model import run_reward_model
from tests.conftest import write_config


@pytest.fixture(scope="session")
def upstream(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("grpo")
    config = load_config(write_config(root))
    base = run_base(config, progress=False)
    rm = run_reward_model(config, run_annotate(config, base.uri).uri)
    prompts = {task: run_filter_prompts(config, task, base.uri, rm.uri) for task in ("t2i", "edit")}
    return root, config, base, rm, prompts


@pytest.fixture(scope="session")
def teachers(upstream):
    _, config, base, rm, prompts = upstream
    return {f"{task}_teacher": run_grpo(config, task, base.uri, rm.uri, prompts[task].uri, progress=False).uri
            for task in ("t2i", "edit")}
