"""experiments.opd_levers.opd_levers: OPD variants on one chain, each a normal opd artifact, in one table."""

import dataclasses
import json

import pytest

from experiments.opd_levers.opd_levers import VARIANTS, main
from flowrl.config import load_config
from flowrl.stages.opd import SECTIONS
from tests.conftest import ROOT, write_config

UNUSED = ["--base", "unused", "--teacher", "t2i_teacher=unused", "--teacher", "edit_teacher=unused",
          "--prompts", "t2i=unused", "edit=unused"]


def test_each_variant_is_a_valid_opd_section_that_changes_only_its_keys():
    from experiments.grpo_ablations.grpo_ablations import with_section

    from flowrl.config import merge_data

    config = load_config(ROOT / "configs" / "shapes.yaml")
    for name, keys in VARIANTS.items():
        changed = with_section(config, "opd", keys).opd
        assert dataclasses.asdict(changed) == merge_data(dataclasses.asdict(config.opd), keys), name


def test_a_set_the_variant_varies_and_bad_arguments_are_refused_before_any_work():
    with pytest.raises(SystemExit, match="--set num_steps: the variant rollout_10steps sets it itself"):
        main([*UNUSED, "--variants", "rollout_10steps", "--set", "num_steps=5"])
    with pytest.raises(SystemExit, match=r"--variants: \['nope'\] not in the levers table"):
        main([*UNUSED, "--variants", "nope"])
    with pytest.raises(SystemExit, match=r"--pipeline: 'nope' not in the levers table"):
        main([*UNUSED, "--pipeline", "nope"])
    with pytest.raises(SystemExit, match="--prompts: give t2i=URI edit=URI"):
        main(["--base", "unused", "--teacher", "t2i_teacher=unused", "--prompts", "t2i=unused", "mixed=unused"])


def _chain_args(upstream, teachers, tmp_path) -> list[str]:
    _, _, base, _, prompts = upstream
    argv = ["--config", str(write_config(tmp_path)), "--base", base.uri, "--prompts", f"t2i={prompts['t2i'].uri}",
            f"edit={prompts['edit'].uri}", "--artifacts", str(tmp_path / "artifacts"), "--threads", "1"]
    for name, uri in teachers.items():
        argv += ["--teacher", f"{name}={uri}"]
    return argv


def test_the_table_holds_each_variant_of_one_chain(upstream, teachers, tmp_path):
    """On the smoke chain: every variant over the table's base section (K = 4), each a run of its own; the
    same variant again is the same artifact, reused and said to be. Each entry's deltas are its judge scores
    minus the base's."""
    from experiments.grpo_ablations.grpo_ablations import with_section
    from experiments.opd_levers.opd_levers import LEVERS_BASE

    output = tmp_path / "opd_levers.json"
    main([*_chain_args(upstream, teachers, tmp_path), "--output", str(output), "--variants", "config", "match_2states"])
    table = json.loads(output.read_text())["levers"]
    config = with_section(load_config(tmp_path / "config.yaml"), "opd", LEVERS_BASE)
    assert config.opd.timesteps.per_trajectory == 4
    assert table["config_hash"] == config.section_hash(*SECTIONS)
    assert table["opd_config"] == json.loads(json.dumps(dataclasses.asdict(config.opd)))
    assert set(table["teachers"]) == {"t2i_teacher", "edit_teacher"} and table["machine"]["cpu_count"] > 0
    rows = table["variants"]
    assert not rows["config"]["reused"] and not rows["match_2states"]["reused"]
    assert rows["config"]["artifact"] != rows["match_2states"]["artifact"]
    for name, row in rows.items():
        assert row["opd"] == VARIANTS[name] and row["threads"] == 1 and row["wall_s"] >= row["train_s"] > 0
        assert row["deltas"]["t2i"] == pytest.approx(row["judge"]["t2i/alignment"] - table["base"]["t2i/alignment"])
        assert row["deltas"]["edit"] == pytest.approx(row["judge"]["edit/accuracy"] - table["base"]["edit/accuracy"])
        assert set(row["gain_kept"]) == {"t2i_teacher (t2i/alignment)", "edit_teacher (edit/accuracy)"}
        assert [m[0] for m in row["monitor"]] == [0, 2, 4]
    again = main([*_chain_args(upstream, teachers, tmp_path), "--variants", "config"])["variants"]["config"]
    assert again["reused"] and again["artifact"] == rows["config"]["artifact"]


def test_the_pipeline_entry_runs_the_variant_through_pyflyte(upstream, teachers, tmp_path):
    """``--pipeline VARIANT``: `pyflyte run pipelines/post_train.py opd_stage` with the variant's keys, in the
    Elastic worker, nothing reused; the entry joins the table's other keys in the output file."""
    output = tmp_path / "opd_levers.json"
    output.write_text(json.dumps({"levers": {"variants": {"kept": {}}}}))
    entry = main([*_chain_args(upstream, teachers, tmp_path), "--output", str(output), "--pipeline", "rollout_10steps"])
    table = json.loads(output.read_text())["levers"]
    assert table["variants"] == {"kept": {}} and table["pipeline"] == entry
    assert entry["variant"] == "rollout_10steps" and entry["opd"] == {"num_steps": 10} and entry["threads"] == 1
    assert entry["command_wall_s"] > entry["wall_s"] >= entry["train_s"] > 0
    assert 0.0 <= entry["student"]["t2i/alignment"] <= 1.0
