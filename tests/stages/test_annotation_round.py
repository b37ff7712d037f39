"""The second annotation round (pipeline.annotation_rounds: 2): annotate on the round-1 policies' samples,
the reward models refreshed from the first round's, GRPO continued from its first round, and the workflow
that chains them."""

import dataclasses
import logging

import numpy as np
import pandas as pd
import pytest
import torch

from flowrl.config import ConfigError
from flowrl.rewards.annotations import decode_png
from flowrl.rewards.shapes_scorer import ShapesScorer
from flowrl.stages.annotate import run_annotate, sample_seeds
from flowrl.stages.reward_model import run_reward_model
from flowrl.storage import ArtifactError, ArtifactStore, fetch, read_manifest

log = logging.getLogger(__name__)


def _small_round(config, **round_keys):
    """``config`` with a small second round (one prompt per category and kind, one sample each)."""
    keys = {"t2i_per_category": 1, "edit_per_kind": 1, "model_samples": 1, **round_keys}
    policy_round = dataclasses.replace(config.annotate.policy_round, **keys)
    return dataclasses.replace(config, annotate=dataclasses.replace(config.annotate, policy_round=policy_round))


@pytest.fixture(scope="module")
def second_round(upstream, teachers):
    _, config, base, _, _ = upstream
    config = _small_round(config)
    first = run_annotate(config, base.uri, progress=False)
    policies = {"t2i": teachers["t2i_teacher"], "edit": teachers["edit_teacher"]}
    return config, first, run_annotate(config, base.uri, previous_uri=first.uri, policy_uris=policies, progress=False)


def test_round_two_keeps_round_one_and_adds_the_policies_samples(upstream, teachers, second_round):
    from flowrl.evaluation import generate, to_uint8
    from flowrl.models import load_checkpoint

    _, _, base, _, _ = upstream
    config, first, second = second_round
    assert read_manifest(second.uri).inputs == {"base": base.uri, "previous": first.uri,
                                                "policy_t2i": teachers["t2i_teacher"],
                                                "policy_edit": teachers["edit_teacher"]}
    old = pd.read_parquet(fetch(first.uri) / "pointwise.parquet")
    both = pd.read_parquet(fetch(second.uri) / "pointwise.parquet")
    assert list(both[both["round"] == 1]["id"]) == list(old["id"])  # the first round's rows, unchanged
    new = both[both["round"] == 2]
    a, r = config.annotate, config.annotate.policy_round
    assert len(new) == (6 * r.t2i_per_category + 4 * r.edit_per_kind) * (4 + r.model_samples) * a.labels_per_image
    assert new["id"].str.startswith("r2-").all() and new["group"].str.startswith("r2-").all()
    pairs = pd.read_parquet(fetch(second.uri) / "pairwise.parquet")
    assert set(pairs["round"]) == {1, 2}
    # the first T2I prompt's policy sample (after its 4 rendered candidates) is the T2I teacher's image at
    # its seed, and not the base's
    row = new[new["id"].str.startswith("r2-t2i-00000-4-")].iloc[0]
    seed = sample_seeds(r.seed, "t2i", 6 * r.t2i_per_category * r.model_samples)[0]

    def sample(uri):
        model = load_checkpoint(fetch(uri), expected_family="shapes", cfg_renorm=config.sampler.cfg_renorm)
        return to_uint8(generate(model, [row["prompt"]], [seed], config.sampler, batch_size=1))[0]

    stored = decode_png(row["image"])
    assert np.array_equal(stored, sample(teachers["t2i_teacher"]))
    assert not np.array_equal(stored, sample(base.uri))
    assert second.metrics["round2/t2i/pointwise_rows"] == float((new["task"] == "t2i").sum())


def test_round_two_version_follows_its_policies_and_refuses_wrong_inputs(upstream, teachers, second_round, tmp_path):
    import shutil

    _, _, base, rm, _ = upstream
    config, first, second = second_round
    # the same T2I teacher committed again under another version: another input URI, another artifact
    store = ArtifactStore(config.run.artifact_root)
    manifest = read_manifest(teachers["t2i_teacher"])
    files = shutil.copytree(fetch(teachers["t2i_teacher"]), tmp_path / "teacher")
    (files / "manifest.json").unlink()
    copy = store.commit(files, stage="grpo_t2i", version="copy-of-teacher",
                        config_hash=manifest.config_hash, inputs=manifest.inputs)
    other = run_annotate(config, base.uri, previous_uri=first.uri,
                         policy_uris={"t2i": copy, "edit": teachers["edit_teacher"]}, progress=False)
    assert other.uri != second.uri and not other.reused
    again = run_annotate(config, base.uri, previous_uri=first.uri,
                         policy_uris={"t2i": teachers["t2i_teacher"], "edit": teachers["edit_teacher"]})
    assert again.reused and again.uri == second.uri
    swapped = {"t2i": teachers["edit_teacher"], "edit": teachers["edit_teacher"]}
    with pytest.raises(ArtifactError, match=r"--policies t2i=.*grpo_edit, where a grpo_t2i"):
        run_annotate(config, base.uri, previous_uri=first.uri, policy_uris=swapped)
    with pytest.raises(ArtifactError, match=r"--previous .*stage reward_model, where an annotate"):
        run_annotate(config, base.uri, previous_uri=rm.uri, policy_uris={"t2i": teachers["t2i_teacher"],
                                                                         "edit": teachers["edit_teacher"]})
    with pytest.raises(ConfigError, match="needs both"):
        run_annotate(config, base.uri, previous_uri=first.uri)


def test_refresh_starts_from_the_init_weights_and_refuses_other_artifacts(upstream, second_round):
    _, config, base, rm, _ = upstream
    _, _, second = second_round

    def unchanged(rounds: int) -> dict[str, bool]:
        cfg = dataclasses.replace(config, reward_model=dataclasses.replace(config.reward_model,
                                                                           refresh_steps=rounds))
        refreshed = run_reward_model(cfg, second.uri, init_uri=rm.uri)
        assert read_manifest(refreshed.uri).inputs == {"annotations": second.uri, "init": rm.uri}
        out = {}
        for name in ("t2i/pointwise_quality", "t2i/pairwise", "edit/pointwise_alignment"):
            before = ShapesScorer.load(fetch(rm.uri) / name).state_dict()
            after = ShapesScorer.load(fetch(refreshed.uri) / name).state_dict()
            out[name] = all(torch.equal(before[k], after[k]) for k in before)
        return out

    assert all(unchanged(0).values())  # 0 steps: the first round's scorers, bit for bit
    assert not any(unchanged(2).values())  # 2 steps moved every one of them
    with pytest.raises(ArtifactError, match=r"--init .*stage base, where a reward_model artifact"):
        run_reward_model(config, second.uri, init_uri=base.uri)
    # the first round's version does not depend on the refresh's steps
    other = dataclasses.replace(config, reward_model=dataclasses.replace(config.reward_model, refresh_steps=7))
    assert run_reward_model(other, fetch_annotations(rm.uri)).uri == rm.uri


def fetch_annotations(reward_model_uri: str) -> str:
    return read_manifest(reward_model_uri).inputs["annotations"]


def test_grpo_round_two_starts_from_init_and_keeps_the_base_as_reference(upstream, teachers):
    from flowrl.models.families import family_of
    from flowrl.stages.grpo import policy_and_reference, round_config, run_grpo

    _, config, base, rm, prompts = upstream
    config = dataclasses.replace(config, grpo=dataclasses.replace(config.grpo, kl_coef=0.1, round1_iterations=2))
    family = family_of(config)
    init = teachers["t2i_teacher"]
    policy, reference = policy_and_reference(config, family, fetch(base.uri), "t2i", fetch(init))
    trained = family.trained_state(fetch(init), config, "t2i")
    based = family.trained_state(fetch(base.uri), config, "t2i")
    start = policy.module.state_dict()
    assert all(torch.equal(start[k], trained[k]) for k in trained)  # iteration 0's policy is the init
    ref = family.trainable_module(reference).state_dict()
    assert all(torch.equal(ref[k], based[k]) for k in based)  # the KL reference is the base
    assert any(not torch.equal(trained[k], based[k]) for k in based)  # (and the two differ)
    # the rounds share the loop: 2 iterations, then the other 2 on a seed of their own
    one, two = round_config(config, 1, None).grpo, round_config(config, 2, init).grpo
    assert (one.loop.iterations, two.loop.iterations) == (2, config.grpo.loop.iterations - 2)
    assert one.seed == config.grpo.seed != two.seed
    timed = dataclasses.replace(config, grpo=dataclasses.replace(
        config.grpo, loop=dataclasses.replace(config.grpo.loop, time_budget_s=100.0)))
    assert round_config(timed, 1, None).grpo.loop.time_budget_s == pytest.approx(50.0)
    with pytest.raises(ConfigError, match="--init"):
        round_config(config, 2, None)
    with pytest.raises(ConfigError, match="give --round 2 with it"):  # an init trains nothing but round 2
        round_config(config, None, init)
    result = run_grpo(config, "t2i", base.uri, rm.uri, prompts["t2i"].uri, init_uri=init, rl_round=2, progress=False)
    assert result.metrics["iterations"] == 2 and result.metrics["init"] == init
    assert read_manifest(result.uri).inputs["init"] == init and result.uri != init
    with pytest.raises(ArtifactError, match=r"--init .*grpo_edit, where a grpo_t2i"):
        run_grpo(config, "t2i", base.uri, rm.uri, prompts["t2i"].uri, init_uri=teachers["edit_teacher"], rl_round=2)


def test_the_switch_and_the_workflow(tmp_path):
    """The workflow compiles with both branches, and the switch task reads pipeline.annotation_rounds (and
    refuses a first round as long as the loop)."""
    from flytekit.types.file import FlyteFile

    from pipelines.post_train import post_train
    from tasks.annotate import annotation_rounds
    from tests.conftest import write_config

    names = {n.id for n in post_train.nodes}
    assert len(names) > 10
    one = annotation_rounds(config=FlyteFile(str(write_config(tmp_path / "one"))))
    assert (one.two, one.first_grpo_round) == (False, 0)
    two = annotation_rounds(config=FlyteFile(str(write_config(tmp_path / "two", pipeline={"annotation_rounds": 2},
                                                              grpo={"round1_iterations": 2}))))
    assert (two.two, two.first_grpo_round) == (True, 1)
    with pytest.raises(Exception, match="round1_iterations = 4 must be below"):
        annotation_rounds(config=FlyteFile(str(write_config(tmp_path / "bad", pipeline={"annotation_rounds": 2},
                                                            grpo={"round1_iterations": 4}))))
