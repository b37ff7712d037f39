"""Resume (issue 31, item 5): operational keys are out of a stage's version, so `--resume` after changing one
continues the run's checkpoints; `--resume` says what it resumed from, or that it found nothing and starts fresh."""

import dataclasses
import logging
import typing

import pytest
import torch

from flowrl.config import FlowRLConfig, from_dict, load_config
from flowrl.rl.trainer import Checkpoints, LoopSettings, LoopTrainer
from flowrl.stages import grpo as grpo_stage
from flowrl.stages import opd as opd_stage
from flowrl.stages import reward_model as reward_model_stage
from flowrl.stages.base import SECTIONS as BASE_SECTIONS
from flowrl.stages.common import stage_version
from flowrl.storage import ArtifactStore
from tests.conftest import ROOT, write_config

# (key, another value): keys that change how a stage runs, not what it makes
OPERATIONAL = [
    ("grpo.reward_url", "http://127.0.0.1:9/"),
    ("grpo.reward_retries", 9),
    ("grpo.reward_timeout_s", 5.0),
    ("grpo.reward_token_env", "FLOWRL_REWARD_TOKEN"),
    ("grpo.reward_gpus", 3),
    ("grpo.loop.checkpoint_every", 7),
    ("grpo.loop.grid_every", 3),
    ("opd.loop.checkpoint_every", 7),
    ("opd.loop.grid_every", 3),
    ("base.log_every", 7),
    ("base.checkpoint_every", 7),
    ("reward_model.checkpoint_every", 7),
]
# keys that change a stage's result (micro-batching and recomputation only up to float rounding: they stay in)
RESULT = [
    ("grpo.optim.lr", 3e-4),
    ("grpo.reward_backend", "server"),
    ("grpo.reward_chunks", 1),
    ("grpo.loop.eval_every", 3),
    ("grpo.optim.micro_batch", 2),
    ("grpo.rollout.micro_batch", 2),
    ("grpo.optim.gradient_checkpointing", True),
    ("grpo.reference_device", "cpu"),
    ("opd.optim.micro_batch", 2),
    ("opd.states_per_forward", 2),
    ("opd.teacher_devices", ("t2i_teacher=cpu",)),
]
STAGE_SECTIONS = {"grpo": grpo_stage.SECTIONS, "opd": opd_stage.SECTIONS, "base": BASE_SECTIONS,
                  "reward_model": reward_model_stage.SECTIONS}


def _changed(config, key: str, value):
    """``config`` with the value at the dotted ``key`` (a section's key, or a subsection's) replaced."""
    name, _, rest = key.partition(".")
    inner = _changed(getattr(config, name), rest, value) if rest else value
    return dataclasses.replace(config, **{name: inner})


def _value(config, key: str):
    for part in key.split("."):
        config = getattr(config, part)
    return config


def _operational_keys(cls=FlowRLConfig, prefix="") -> set[str]:
    keys = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(hints[f.name]):  # a section
            keys |= _operational_keys(hints[f.name], f"{prefix}{f.name}.")
        elif f.metadata.get("operational"):
            keys.add(f"{prefix}{f.name}")
    return keys


def test_the_operational_keys_are_the_listed_ones():
    """A key newly marked operational is added to OPERATIONAL (and so to the hash tests below)."""
    assert _operational_keys() == {key for key, _ in OPERATIONAL}


@pytest.mark.parametrize("scenario", ["shapes.yaml", "smoke.yaml", "qwen_image.yaml"])
@pytest.mark.parametrize("key,value", OPERATIONAL, ids=[k for k, _ in OPERATIONAL])
def test_an_operational_key_leaves_the_stage_version_alone(scenario, key, value):
    config = load_config(ROOT / "configs" / scenario)
    other = _changed(config, key, value)
    assert _value(other, key) == value
    sections = STAGE_SECTIONS[key.split(".")[0]]
    assert other.section_hash(*sections) == config.section_hash(*sections)
    stage = {"grpo": "grpo_t2i", "opd": "opd", "base": "base", "reward_model": "reward_model"}[key.split(".")[0]]
    inputs = {"base": "file:///a/base/v1"}
    assert stage_version(stage, other, sections, inputs, code="c") == stage_version(stage, config, sections, inputs,
                                                                                      code="c")


@pytest.mark.parametrize("key,value", RESULT, ids=[k for k, _ in RESULT])
def test_a_result_key_changes_the_stage_version(key, value):
    config = FlowRLConfig()
    sections = STAGE_SECTIONS[key.split(".")[0]]
    assert _changed(config, key, value).section_hash(*sections) != config.section_hash(*sections)


def test_an_operational_key_at_its_default_hashes_as_a_config_without_the_flag_did():
    """The key counts at its default whatever its value: a config at the defaults keeps the payload it had, so
    shapes results and caches keyed on it stay valid (an operational key that was also `added` stays left out)."""
    from flowrl.config import GRPOConfig, _hash_payload

    payload = _hash_payload(GRPOConfig(reward_url="http://elsewhere:1/", reward_timeout_s=3.0, reward_retries=0))
    assert payload["reward_url"] is None and payload["reward_timeout_s"] == 120.0
    assert "reward_retries" not in payload and "reward_gpus" not in payload
    assert payload == _hash_payload(GRPOConfig())
    loaded = from_dict(FlowRLConfig, {"grpo": {"reward_retries": 8}})
    assert loaded.grpo.reward_retries == 8  # the run still uses the value it was given


class _Counting(LoopTrainer):
    """A loop whose iterations add 1 to a weight."""

    def __init__(self, checkpoints, iterations=4):
        module = torch.nn.Linear(1, 1)
        super().__init__(None, module, torch.optim.SGD(module.parameters(), lr=0.1), None,
                         LoopSettings(iterations=iterations, eval_every=100, checkpoint_every=2, name="counting"),
                         checkpoints=checkpoints)

    def step(self, iteration):
        with torch.no_grad():
            self.module.weight.add_(1.0)
        return {"train/loss": 0.0}


def test_resume_without_a_checkpoint_says_it_starts_fresh(tmp_path, caplog):
    checkpoints = Checkpoints(ArtifactStore(str(tmp_path)), "grpo_t2i", "0123abcd")
    with caplog.at_level(logging.INFO, logger="flowrl"):
        assert not _Counting(checkpoints).resume()
        assert not _Counting(None).resume()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert ("grpo_t2i: --resume: no checkpoint of version 0123abcd in " in warnings[0].getMessage()
            and warnings[0].getMessage().endswith("starting fresh from iteration 0"))
    assert "counting: --resume: this run keeps no checkpoints; starting fresh" in warnings[1].getMessage()


def test_resume_names_the_checkpoint_and_its_iteration(tmp_path, caplog):
    checkpoints = Checkpoints(ArtifactStore(str(tmp_path)), "grpo_t2i", "0123abcd")
    _Counting(checkpoints).train(progress=False, stop_after=3)  # checkpoint at 2
    resumed = _Counting(checkpoints)
    with caplog.at_level(logging.INFO, logger="flowrl"):
        assert resumed.resume() and resumed.state.iteration == 2
    (record,) = [r for r in caplog.records if "--resume" in r.getMessage()]
    assert record.levelno == logging.INFO and record.name.startswith("flowrl.")
    assert record.getMessage() == (f"grpo_t2i: --resume: resumed version 0123abcd at iteration 2 of 4 from the "
                                   f"checkpoint {checkpoints.latest()}")
    assert checkpoints.latest().endswith("0123abcd-0000002")


@pytest.fixture(scope="module")
def upstream(upstream, tmp_path_factory):
    """The session's smoke base, reward model and T2I prompts (tests/conftest.py), with a config of 3 GRPO
    iterations in the same store: base to filtering hash none of the grpo keys, so their artifacts are these."""
    _, shared, base, rm, prompts = upstream
    root = tmp_path_factory.mktemp("resume")
    path = write_config(root, run={"artifact_root": shared.run.artifact_root, "tracking_uri": shared.run.tracking_uri},
                        grpo={"loop": {"iterations": 3, "checkpoint_every": 2, "eval_every": 4, "grid_every": 4}})
    return path, load_config(path), base, rm, prompts["t2i"]


def test_grpo_resumes_its_checkpoint_after_the_reward_retries_change(upstream, tmp_path, caplog, capsys):
    """A GRPO run killed after its checkpoint at iteration 2, resumed through the CLI with grpo.reward_retries (and
    the other transport keys) raised: the same version, continued from iteration 2, not a new run from 0."""
    from flowrl.cli import main

    path, config, base, rm, prompts = upstream
    output = tmp_path / "store"
    with caplog.at_level(logging.INFO, logger="flowrl"), pytest.raises(InterruptedError):
        grpo_stage.run_grpo(config, "t2i", base.uri, rm.uri, prompts.uri, output_root=str(output), progress=False,
                            resume=True, stop_after=2)
    fresh = [r.getMessage() for r in caplog.records if "--resume" in r.getMessage()]
    assert len(fresh) == 1 and "grpo_t2i: --resume: no checkpoint of version" in fresh[0], fresh
    assert fresh[0].endswith("starting fresh from iteration 0")
    inputs = {"base": base.uri, "reward_model": rm.uri, "prompts": prompts.uri}
    version = stage_version("grpo_t2i", config, grpo_stage.SECTIONS, inputs)
    checkpoints = Checkpoints(ArtifactStore(str(output)), "grpo_t2i", version)
    assert [i for i, _ in checkpoints.complete()] == [2]

    overrides = ["grpo.reward_retries=9", "grpo.reward_timeout_s=5", "grpo.reward_token_env=FLOWRL_RESUME_TOKEN",
                 "grpo.loop.checkpoint_every=1"]
    changed = load_config(path, overrides)
    assert changed.grpo.reward_retries == 9 != config.grpo.reward_retries
    assert stage_version("grpo_t2i", changed, grpo_stage.SECTIONS, inputs) == version

    caplog.clear()
    capsys.readouterr()
    argv = ["grpo", "--config", str(path), "--task", "t2i", "--base", base.uri, "--reward-model", rm.uri,
            "--prompts", prompts.uri, "--output", str(output), "--no-progress", "--no-tracking", "--resume"]
    for entry in overrides:
        argv += ["--set", entry]
    with caplog.at_level(logging.INFO, logger="flowrl"):
        assert main(argv) == 0
    resumed = [r for r in caplog.records if "--resume" in r.getMessage()]
    assert len(resumed) == 1 and resumed[0].levelno == logging.INFO
    assert resumed[0].getMessage().startswith(f"grpo_t2i: --resume: resumed version {version} at iteration 2 of 3 "
                                              f"from the checkpoint ")
    assert resumed[0].getMessage().endswith(f"{version}-0000002")
    uri = capsys.readouterr().out.strip().splitlines()[-1]
    assert uri.rstrip("/").endswith(f"grpo_t2i/{version}")  # the run's own version, finished
    assert [i for i, _ in checkpoints.complete()] == [2, 3]  # iteration 3 of the same run (checkpoint_every 1)
