"""The committed measurements (results/*.json) match the shipped config and hold
what the README claims of them; each test names the make target that
re-measures its file after a change that affects it."""

import json
import re

import pytest

from flowrl.config import load_config
from flowrl.stages.base import SECTIONS
from tests.conftest import ROOT



def _name(uri: str) -> str:
    """An artifact URI's last part (its version), whichever root it was written under."""
    return uri.rstrip("/").rsplit("/", 1)[-1]


def _current_table(file: str, name: str, variants: dict, task: str = "t2i") -> tuple[dict, object]:
    """The ``task`` table of ``results/<file>`` made by ``bench.grpo_ablations --table <name>`` with exactly
    the table's variants, and on the grpo and filter config of configs/shapes.yaml (else it is stale)."""
    from flowrl.stages.grpo import SECTIONS as GRPO_SECTIONS

    table = json.loads((ROOT / "results" / file).read_text())[task]
    config = load_config(ROOT / "configs" / "shapes.yaml")
    assert table["table"] == name and set(table["variants"]) == set(variants)
    assert table["config_hash"] == config.section_hash(*GRPO_SECTIONS), f"{file} is stale"
    assert table["filter_config_hash"] == config.section_hash("filter"), f"{file} is stale"
    return table, config

def _check_variant(name: str, entry: dict, table: dict, grpo_keys: dict, config, headline: str = "t2i/alignment"):
    """One variant of an ablation table: trained with exactly ``grpo_keys`` over the config, its headline delta
    the judge's score minus the table's base, a wall time, and the held-out monitor at iteration 0 and every
    ``eval_every`` up to its last."""
    assert entry["grpo"] == grpo_keys, name
    delta = entry["judge"][headline] - table["base"][headline]
    assert abs(entry["headline_delta"] - delta) < 1e-9 and entry["wall_s"] > 0, name
    iterations = grpo_keys.get("iterations", config.grpo.iterations)
    eval_every = grpo_keys.get("eval_every", config.grpo.eval_every)
    assert [m[0] for m in entry["monitor"]] == list(range(0, iterations + 1, eval_every)), name


def test_base_results_match_config_and_targets():
    results = json.loads((ROOT / "results" / "base_shapes.json").read_text())
    config = load_config(ROOT / "configs" / "shapes.yaml")
    assert results["config_hash"] == config.section_hash(*SECTIONS), "results/base_shapes.json is stale"
    m = results["metrics"]
    assert 0.30 <= m["t2i/alignment"] <= 0.75
    assert 0.20 <= m["edit/accuracy"] <= 0.70
    assert m["fidelity"] >= 0.8
    assert m["wall_s"] <= 12 * 60 and not results["reused"]
    assert results["machine"]["cpu_count"] == 2


def test_reward_model_results_match_config_and_targets():
    from flowrl.stages.reward_model import SECTIONS as RM_SECTIONS

    results = json.loads((ROOT / "results" / "reward_model_shapes.json").read_text())
    config = load_config(ROOT / "configs" / "shapes.yaml")
    assert results["config_hash"] == config.section_hash(*RM_SECTIONS), "results/reward_model_shapes.json is stale"
    m = results["metrics"]
    t2i = m["t2i"]["pointwise_alignment"]
    assert t2i["reference"] == "judge" and t2i["spearman"] >= 0.8  # issue 3's bar, on held-out annotation groups
    assert t2i["heldout_images"] >= 1000
    for task in ("t2i", "edit"):
        for name, entry in m[task].items():
            if name == "split":
                continue
            assert 0.0 < entry["spearman"] <= entry["spearman_ceiling"] + 0.02, (task, name)
            assert entry["pairwise_accuracy"] > 0.5, (task, name)
        assert "pairwise" in m[task] and "unseen_prompt_spearman" in m[task]["pointwise_alignment"]
    assert results["machine"]["cpu_count"] == 2 and not results["reused"]


def test_grpo_results_match_config_and_show_gains():
    """What is claimed in the README for GRPO: both teachers beat the base on
    their task's judge metric (the issue's +0.20 / +0.15 targets are not met
    yet, and this test does not pretend otherwise)."""
    from flowrl.stages.grpo import HEADLINE, SECTIONS as GRPO_SECTIONS

    results = json.loads((ROOT / "results" / "grpo_shapes.json").read_text())
    config = load_config(ROOT / "configs" / "shapes.yaml")
    for task in ("t2i", "edit"):
        entry = results[task]
        assert entry["config_hash"] == config.section_hash(*GRPO_SECTIONS), f"grpo_shapes.json[{task}] is stale"
        m = entry["metrics"]
        assert m["task"] == task and m["iterations"] == config.grpo.iterations and not entry["reused"]
        assert m["teacher"][HEADLINE[task]] > m["base"][HEADLINE[task]]
        per_category = [k for k in m["teacher"] if k.startswith(HEADLINE[task] + "/")]
        assert len(per_category) == (6 if task == "t2i" else 4)
        assert m["wall_s"] > 0 and entry["machine"]["cpu_count"] == 2


def test_grpo_ablations_come_from_the_committed_grpo_inputs():
    """results/grpo_ablations.json (`make results/grpo_ablations.json`): the four variants of the issue,
    on the base, reward models and curated prompts of results/grpo_shapes.json, each variant changing
    only its named grpo keys."""
    from flowrl.stages.grpo import SECTIONS as GRPO_SECTIONS

    table = json.loads((ROOT / "results" / "grpo_ablations.json").read_text())["t2i"]
    grpo = json.loads((ROOT / "results" / "grpo_shapes.json").read_text())["t2i"]
    config = load_config(ROOT / "configs" / "shapes.yaml")
    assert table["config_hash"] == config.section_hash(*GRPO_SECTIONS), "grpo_ablations.json is stale"
    assert table["inputs"]["base"].rstrip("/").endswith(grpo["command"].split("--base ")[1].split()[0].rsplit("/", 1)[-1])
    assert table["base"] == grpo["metrics"]["base"]  # the same base, judged the same
    variants = table["variants"]
    assert set(variants) == {"cfg_hybrid", "cfg_both", "cfg_none", "timesteps_all"}
    expected = {"cfg_hybrid": {}, "cfg_both": {"cfg_mode": "both"}, "cfg_none": {"cfg_mode": "none"},
                "timesteps_all": {"timesteps": "all"}}
    for name, entry in variants.items():
        _check_variant(name, entry, table, {"iterations": 60, "eval_every": 20, **expected[name]}, config)


def test_grpo_levers_come_from_the_committed_grpo_inputs():
    """results/grpo_levers.json (`make results/grpo_levers.json`): the prompt-distribution levers on the
    base and reward models of results/grpo_shapes.json, each variant changing only its named keys; the
    per-category filter keeps prompts of every category."""
    from bench.grpo_ablations import LEVERS, split_variant

    table, config = _current_table("grpo_levers.json", "levers", LEVERS)
    grpo = json.loads((ROOT / "results" / "grpo_shapes.json").read_text())["t2i"]
    assert table["inputs"]["base"].rstrip("/").endswith(grpo["command"].split("--base ")[1].split()[0].rsplit("/", 1)[-1])
    assert table["base"] == grpo["metrics"]["base"]
    variants = table["variants"]
    for name, entry in variants.items():
        grpo_keys, filter_keys = split_variant(LEVERS[name])
        _check_variant(name, entry, table, grpo_keys, config)
        assert entry.get("filter", {}) == filter_keys, name
        if filter_keys.get("threshold_scope") == "category":
            assert entry["prompts"] != table["inputs"]["prompts"]
            assert min(entry["kept_fraction"].values()) > 0, entry["kept_fraction"]


def test_grpo_epochs_come_from_the_same_base_as_the_levers():
    """results/grpo_epochs.json (`make results/grpo_epochs.json`): the levers with 2 and 4 PPO epochs. Its
    artifacts may be newer versions of the same stages (a stage's version includes its code), so the base
    is checked by what the judge measures of it: the same as in results/grpo_shapes.json."""
    from bench.grpo_ablations import EPOCHS, split_variant

    table, config = _current_table("grpo_epochs.json", "epochs", EPOCHS)
    grpo = json.loads((ROOT / "results" / "grpo_shapes.json").read_text())["t2i"]
    assert table["base"] == grpo["metrics"]["base"]
    for name, entry in table["variants"].items():
        grpo_keys, filter_keys = split_variant(EPOCHS[name])
        _check_variant(name, entry, table, grpo_keys, config)
        assert entry["grpo"]["epochs"] > 1 and entry["filter"] == filter_keys, name


@pytest.mark.parametrize("table_file, name, variant, curve_file", [
    ("grpo_long.json", "long", "levers_800", "grpo_curve.json"),
    ("grpo_kl_long.json", "kl_long", "first_30pct_kl03_800", "grpo_kl_long_curve.json"),
    ("grpo_trainable_long.json", "trainable_long", "first_30pct_kl01_blocks_lr2e4_600",
     "grpo_trainable_long_blocks_curve.json"),
    ("grpo_trainable_long.json", "trainable_long", "first_30pct_kl01_attention_lr2e4_600",
     "grpo_trainable_long_attention_curve.json"),
])
def test_grpo_curves_judge_every_checkpoint_of_their_long_run(table_file, name, variant, curve_file):
    """results/grpo_curve.json, grpo_kl_long_curve.json and grpo_trainable_long_*_curve.json (`make results/<curve>`;
    the trainable ones from `make results/grpo_trainable_long.json`): a long T2I run (results/grpo_long.json: the
    levers, 800 iterations; grpo_kl_long.json: the first 30 % window with KL 0.3, 800; grpo_trainable_long.json:
    two trainable subsets, 600), judged at the base and every 100 iterations. Its base is the chain of the machine that ran it, so it is compared with its
    own base only: the curve starts at the table's base and ends at the teacher the stage judged, with the
    same held-out sets."""
    from bench import grpo_ablations
    from bench.grpo_ablations import split_variant

    specs = grpo_ablations.TABLES[name]
    long, _ = _current_table(table_file, name, specs)
    curve = json.loads((ROOT / "results" / curve_file).read_text())
    entry = long["variants"][variant]
    grpo_keys, filter_keys = split_variant(specs[variant])
    assert entry["grpo"] == grpo_keys and entry["filter"] == filter_keys
    assert _name(curve["run"]) == _name(entry["artifact"])
    assert _name(curve["base"]) == _name(long["inputs"]["base"])
    points = curve["points"]
    assert [p["iteration"] for p in points] == list(range(0, grpo_keys["iterations"] + 1, grpo_keys["checkpoint_every"]))
    for key in ("t2i/alignment", "fidelity", "t2i/alignment/counting"):
        assert points[0][key] == pytest.approx(long["base"][key], abs=1e-4), key
        assert points[-1][key] == pytest.approx(entry["judge"][key], abs=1e-4), key
    assert all(a["train_s"] < b["train_s"] for a, b in zip(points, points[1:]))
    for p in points:
        assert p["headline_delta"] == pytest.approx(p["t2i/alignment"] - points[0]["t2i/alignment"], abs=1e-3)
    assert curve["machine"]["cpu_capability"] and curve["machine"]["cpu_model"]
    assert (ROOT / "results" / curve_file).with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_the_kl_long_run_replays_the_400_iteration_kl_run_up_to_iteration_400():
    """The 800-iteration KL 0.3 run differs from hold_fidelity's first_30pct_kl03 only in its length, and
    nothing before iteration 400 depends on the length: its curve at 400 is that run's final judge."""
    hold = json.loads((ROOT / "results" / "grpo_hold_fidelity.json").read_text())["t2i"]
    curve = json.loads((ROOT / "results" / "grpo_kl_long_curve.json").read_text())
    (at_400,) = [p for p in curve["points"] if p["iteration"] == 400]
    judge = hold["variants"]["first_30pct_kl03"]["judge"]
    for key in ("t2i/alignment", "fidelity", "t2i/alignment/color_attr", "t2i/alignment/position"):
        assert at_400[key] == pytest.approx(judge[key], abs=1e-4), key


def test_grpo_windows_come_from_the_chain_of_the_long_run():
    """results/grpo_windows.json (`make results/grpo_windows.json`): the T2I levers for 400 iterations with
    the trained steps from four windows of the schedule and with groups of 16, on the base and reward models
    of results/grpo_long.json; each variant changes only its named keys. (``first_half`` is the long run's
    config stopped at 400, but on one thread instead of two: float sums in another order, other weights.)"""
    from bench.grpo_ablations import WINDOWS, split_variant

    table, config = _current_table("grpo_windows.json", "windows", WINDOWS)
    long = json.loads((ROOT / "results" / "grpo_long.json").read_text())["t2i"]
    curve = json.loads((ROOT / "results" / "grpo_curve.json").read_text())
    for key in ("base", "reward_model"):
        assert _name(table["inputs"][key]) == _name(long["inputs"][key]), key
    assert table["base"] == long["base"]
    for variant, entry in table["variants"].items():
        grpo_keys, filter_keys = split_variant(WINDOWS[variant])
        _check_variant(variant, entry, table, grpo_keys, config)
        assert entry["filter"] == filter_keys and grpo_keys["iterations"] == 400, variant
    assert "--threads 1" in table["command"]
    assert curve["points"][0]["t2i/alignment"] == pytest.approx(table["base"]["t2i/alignment"], abs=1e-4)


@pytest.mark.parametrize("file, name, varied", [
    ("grpo_ema.json", "ema", {"ema_decay", "lr"}),
    ("grpo_hold_fidelity.json", "hold_fidelity", {"kl_coef", "noise_level"}),
    ("grpo_kl_long.json", "kl_long", {"kl_coef", "iterations"}),
    ("grpo_kl03_levers.json", "kl03_levers", {"kl_coef", "calibrate"}),
    ("grpo_trainable.json", "trainable", {"kl_coef", "kl_anchor_steps", "trainable", "lr"}),
])
def test_grpo_tables_on_the_first_30pct_window_come_from_the_windows_chain(file, name, varied):
    """results/grpo_ema.json, grpo_hold_fidelity.json, grpo_kl_long.json, grpo_kl03_levers.json and
    grpo_trainable.json (`make results/<file>`): the
    windows table's first 30 % variant with only the named grpo keys (or reward weights) changed, on the same
    base, reward models and curated prompts as results/grpo_windows.json."""
    from bench import grpo_ablations
    from bench.grpo_ablations import WINDOWS, split_variant

    specs = grpo_ablations.TABLES[name]
    table, config = _current_table(file, name, specs)
    windows = json.loads((ROOT / "results" / "grpo_windows.json").read_text())["t2i"]
    for key in ("base", "reward_model", "prompts"):
        assert _name(table["inputs"][key]) == _name(windows["inputs"][key]), key
    assert table["base"] == windows["base"]
    first_30pct = split_variant(WINDOWS["first_30pct"])
    for variant, entry in table["variants"].items():
        grpo_keys, filter_keys = split_variant(specs[variant])
        _check_variant(variant, entry, table, grpo_keys, config)
        assert entry["filter"] == filter_keys == first_30pct[1], variant
        assert entry.get("rewards", {}) == specs[variant].get("rewards", {}), variant
        unvaried = {k: v for k, v in first_30pct[0].items() if k not in varied}
        assert {k: v for k, v in grpo_keys.items() if k not in varied} == unvaried, variant
        assert grpo_keys != first_30pct[0] or entry.get("rewards"), variant  # each variant changes something
    assert "--threads 1" in table["command"]


def test_grpo_trainable_long_runs_the_trainable_subsets_for_600_iterations():
    """results/grpo_trainable_long.json (`make results/grpo_trainable_long.json`): the windows table's first 30 %
    variant with only kl_coef, trainable, lr and iterations changed, two subsets (the trainable table's attention +
    MLPs at lr 2e-4, and attention alone at the same lr and KL) for 600 iterations on one thread. Its chain is the
    one `make` rebuilt on 2026-12-04 (a new base: the headline base score is the windows chain's 0.513, its
    categories are not), so its deltas are read against its own base only."""
    from bench.grpo_ablations import TRAINABLE, TRAINABLE_LONG, WINDOWS, split_variant

    table, config = _current_table("grpo_trainable_long.json", "trainable_long", TRAINABLE_LONG)
    first_30pct, first_30pct_filter = split_variant(WINDOWS["first_30pct"])
    varied = {"kl_coef", "trainable", "lr", "iterations"}
    for variant, entry in table["variants"].items():
        grpo_keys, filter_keys = split_variant(TRAINABLE_LONG[variant])
        _check_variant(variant, entry, table, grpo_keys, config)
        assert entry["filter"] == filter_keys == first_30pct_filter, variant
        assert {k: v for k, v in grpo_keys.items() if k not in varied} == \
            {k: v for k, v in first_30pct.items() if k not in varied}, variant
        assert grpo_keys["iterations"] == 600 and grpo_keys["kl_coef"] == 0.1 and grpo_keys["lr"] == 2e-4, variant
    blocks = split_variant(TRAINABLE_LONG["first_30pct_kl01_blocks_lr2e4_600"])[0]
    assert {**blocks, "iterations": 400} == split_variant(TRAINABLE["first_30pct_kl01_blocks_lr2e4"])[0]
    assert "--threads 1" in table["command"]


def test_grpo_edit_window_comes_from_the_chain_of_the_curve():
    """results/grpo_edit_window.json (`make results/grpo_edit_window.json`): the edit levers with the T2I
    tables' best window (K = 2 of the first 30 %) and KL 0.3 for 400 iterations, on the base and reward
    models of results/grpo_windows.json; its edit base is the curve's iteration 0 (same base, same held-out
    edits, same sampler)."""
    from bench.grpo_ablations import EDIT_LEVERS, EDIT_WINDOW, split_variant

    table, config = _current_table("grpo_edit_window.json", "edit_window", EDIT_WINDOW, task="edit")
    windows = json.loads((ROOT / "results" / "grpo_windows.json").read_text())["t2i"]
    curve = json.loads((ROOT / "results" / "grpo_curve.json").read_text())
    for key in ("base", "reward_model"):
        assert _name(table["inputs"][key]) == _name(windows["inputs"][key]), key
    for key in ("edit/accuracy", "edit/identity", "edit/accuracy/move", "fidelity"):
        assert curve["points"][0][key] == pytest.approx(table["base"][key], abs=1e-4), key
    levers_grpo, levers_filter = split_variant(EDIT_LEVERS["kind_filter_balanced_2steps"])
    for variant, entry in table["variants"].items():
        grpo_keys, filter_keys = split_variant(EDIT_WINDOW[variant])
        _check_variant(variant, entry, table, grpo_keys, config, headline="edit/accuracy")
        assert entry["filter"] == filter_keys == levers_filter, variant
        assert {k: grpo_keys[k] for k in levers_grpo} == levers_grpo, variant
    assert "--threads 1" in table["command"]


def test_grpo_cast_rm_trains_the_kl_configurations_on_other_reward_models_of_the_same_base():
    """results/grpo_cast_rm.json (`make results/grpo_cast_rm.json`): the first 30 % window with KL 0.3 (as in
    results/grpo_hold_fidelity.json) and with KL 0.1 (as in results/grpo_windows.json), on the same base but on
    reward models whose annotation data also held colour casts: other reward models and curated prompts, the
    same base judged the same."""
    from bench.grpo_ablations import CAST_RM, HOLD_FIDELITY, WINDOWS, split_variant

    table, config = _current_table("grpo_cast_rm.json", "cast_rm", CAST_RM)
    windows = json.loads((ROOT / "results" / "grpo_windows.json").read_text())["t2i"]
    assert _name(table["inputs"]["base"]) == _name(windows["inputs"]["base"]) and table["base"] == windows["base"]
    for key in ("reward_model", "prompts"):
        assert _name(table["inputs"][key]) != _name(windows["inputs"][key]), key
    same_as = {"first_30pct_kl03": HOLD_FIDELITY["first_30pct_kl03"], "first_30pct": WINDOWS["first_30pct"]}
    for variant, entry in table["variants"].items():
        grpo_keys, filter_keys = split_variant(CAST_RM[variant])
        assert (grpo_keys, filter_keys) == split_variant(same_as[variant]), variant
        _check_variant(variant, entry, table, grpo_keys, config)
        assert entry["filter"] == filter_keys and entry["prompts"] != table["inputs"]["prompts"], variant
    assert "--threads 1" in table["command"]


def test_fidelity_probe_reads_the_kl_long_run_on_both_reward_models():
    """results/fidelity_probe.json (`make results/fidelity_probe.json`): the base and checkpoints of the KL 0.3
    long run, judged as the GRPO stage judged them (same held-out T2I set and seeds: the same T2I fidelity as
    the tables' base, the 400-iteration KL 0.3 run and the 800-iteration one), each reward model's components,
    and every reward component ranked against every judge term."""
    from flowrl.shapes.judge import FIDELITY_SCALES

    probe = json.loads((ROOT / "results" / "fidelity_probe.json").read_text())
    windows = json.loads((ROOT / "results" / "grpo_windows.json").read_text())["t2i"]
    hold = json.loads((ROOT / "results" / "grpo_hold_fidelity.json").read_text())["t2i"]
    long = json.loads((ROOT / "results" / "grpo_kl_long.json").read_text())["t2i"]
    cast = json.loads((ROOT / "results" / "grpo_cast_rm.json").read_text())["t2i"]
    assert set(probe["models"]) == {"base", "kl03_it100", "kl03_it400", "kl03_it800"}
    assert _name(probe["inputs"]["base"]) == _name(windows["inputs"]["base"])
    assert set(probe["inputs"]["reward_models"]) == {"shipped", "cast"}
    assert _name(probe["inputs"]["reward_models"]["shipped"]) == _name(windows["inputs"]["reward_model"])
    assert _name(probe["inputs"]["reward_models"]["cast"]) == _name(cast["inputs"]["reward_model"])
    judged = {"base": windows["base"], "kl03_it400": hold["variants"]["first_30pct_kl03"]["judge"],
              "kl03_it800": long["variants"]["first_30pct_kl03_800"]["judge"]}
    for name, entry in probe["models"].items():
        assert set(entry["terms"]) == set(FIDELITY_SCALES)
        assert {k.split("/")[0] for k in entry["rewards"]} == {"shipped", "cast"}, name
        if name in judged:
            assert entry["fidelity"] == pytest.approx(judged[name]["t2i/fidelity"], abs=1e-3), name
    for component, row in probe["rank_agreement"].items():
        assert set(row) == set(FIDELITY_SCALES), component
        assert all(v is None or -1 <= v <= 1 for v in row.values()), component


def test_t2i_reward_probe_covers_every_category_of_the_curve_chain():
    """results/t2i_reward_probe.json (`make results/t2i_reward_probe.json`): every T2I category, from the
    base and reward models of the results/grpo_long.json chain, as the README reads it."""
    from flowrl.shapes.prompts import T2I_CATEGORIES

    probe = json.loads((ROOT / "results" / "t2i_reward_probe.json").read_text())
    long = json.loads((ROOT / "results" / "grpo_long.json").read_text())["t2i"]
    assert _name(probe["inputs"]["base"]) == _name(long["inputs"]["base"])
    assert _name(probe["inputs"]["reward_model"]) == _name(long["inputs"]["reward_model"])
    assert set(probe["categories"]) == set(T2I_CATEGORIES)
    for category, row in probe["categories"].items():
        assert row["groups"] == probe["per_category"] and 0 <= row["mixed_groups"] <= row["groups"], category
        assert 0.0 <= row["p_right"] <= 1.0
        if row["mixed_groups"]:
            assert 0.0 <= row["auc_in_mixed"] <= 1.0 and 0.0 <= row["top_is_right_in_mixed"] <= 1.0


def test_an_ablation_table_of_one_task_refuses_the_other(capsys):
    """The levers tables name one task's categories (sampling weights of T2I categories or edit kinds):
    run on the other task they would fail after minutes of filtering, so they are refused up front."""
    import pytest

    from bench.grpo_ablations import main

    common = ["--base", "unused", "--reward-model", "unused", "--prompts", "unused"]
    for table, task in (("edit_levers", "t2i"), ("levers", "edit"), ("epochs", "edit")):
        with pytest.raises(SystemExit, match=f"--table {table} is a .* table, got --task {task}"):
            main(["--table", table, "--task", task, *common])


def test_a_set_that_names_a_key_the_variant_varies_is_refused():
    """``--set iterations=400`` on the long table would be overridden by the variant's own 800 without a
    word; it is refused up front, naming the key and the variant."""
    from bench.grpo_ablations import main

    common = ["--base", "unused", "--reward-model", "unused", "--prompts", "unused"]
    with pytest.raises(SystemExit, match="--set iterations: the variant levers_800 sets it itself"):
        main(["--table", "long", "--task", "t2i", "--set", "iterations=400", *common])
    with pytest.raises(SystemExit, match="--set cfg_mode: the variant cfg_none sets it itself"):
        main(["--task", "t2i", "--variants", "cfg_none", "--set", "cfg_mode=hybrid", *common])


def test_a_variant_overrides_nested_reward_weights_key_by_key():
    """A table variant may set one reward weight (``{"rewards": {"t2i": {"fidelity": 1.0}}}``): the other
    weights keep the config's values, and a misspelt key is refused like in a config file."""
    from bench.grpo_ablations import HOLD_FIDELITY, split_variant, with_section
    from flowrl.config import ConfigError

    config = load_config(ROOT / "configs" / "shapes.yaml")
    changed = with_section(config, "rewards", HOLD_FIDELITY["first_30pct_fidelity1"]["rewards"])
    assert changed.rewards.t2i.fidelity == 1.0 and changed.rewards.t2i.alignment == config.rewards.t2i.alignment
    assert changed.rewards.t2i.quality == config.rewards.t2i.quality and changed.rewards.edit == config.rewards.edit
    assert changed.section_hash("rewards") != config.section_hash("rewards")
    with pytest.raises(ConfigError, match="rewards.t2i.fidelty"):
        with_section(config, "rewards", {"t2i": {"fidelty": 1.0}})
    # a variant that sets only reward weights has no grpo or filter keys
    assert split_variant({"rewards": {"t2i": {"fidelity": 1.0}}}) == ({}, {})


def test_opd_results_hold_every_model_and_match_the_config():
    """results/opd_shapes.json (`make results/opd_shapes.json`): the judge on the six models of issue 6."""
    results = json.loads((ROOT / "results" / "opd_shapes.json").read_text())
    config = load_config(ROOT / "configs" / "shapes.yaml")
    meta = results["meta"]
    assert meta["config_hash"] == config.section_hash("run.seed", "world", "sampler", "eval"), "opd_shapes.json is stale"
    assert meta["machine"]["cpu_count"] == 2
    models = ("base", "t2i_teacher", "edit_teacher", "mix_rl", "student", "student_offpolicy")
    assert set(results) == {*models, "meta"}
    stages = {"base": "base", "t2i_teacher": "grpo_t2i", "edit_teacher": "grpo_edit", "mix_rl": "grpo_mixed",
              "student": "opd", "student_offpolicy": "opd_offpolicy"}
    for name in models:
        entry = results[name]
        assert entry["stage"] == stages[name]
        assert set(entry["t2i_alignment_per_category"]) == {
            "single_object", "two_objects", "counting", "colors", "position", "color_attr"}
        assert set(entry["edit_accuracy_per_kind"]) == {"recolor", "remove", "add", "move"}
        for key in ("t2i_alignment", "edit_accuracy", "identity", "fidelity"):
            assert 0.0 <= entry[key] <= 1.0, (name, key)
        assert entry["wall_s"] > 0
    # what the README claims of the committed run (2026-12-02): both teachers above base on their own task,
    # the student above base on both. Issue 6's bars (>= 90 % of each teacher's gain, the student above
    # Mix-RL, OPD within 8 minutes) are reported as missed in the README, not asserted.
    base, student = results["base"], results["student"]
    assert results["t2i_teacher"]["t2i_alignment"] > base["t2i_alignment"]
    assert results["edit_teacher"]["edit_accuracy"] > base["edit_accuracy"]
    assert student["t2i_alignment"] > base["t2i_alignment"] and student["edit_accuracy"] > base["edit_accuracy"]
    # one chain: the judge is deterministic, so the base and the teachers score here what their own stages
    # measured in results/base_shapes.json and results/grpo_shapes.json (same weights, same held-out sets)
    base_run = json.loads((ROOT / "results" / "base_shapes.json").read_text())
    assert base["artifact_uri"] == base_run["artifact_uri"]
    assert base["t2i_alignment"] == base_run["metrics"]["t2i/alignment"]
    assert base["edit_accuracy"] == base_run["metrics"]["edit/accuracy"]
    grpo = json.loads((ROOT / "results" / "grpo_shapes.json").read_text())
    for name, task, key in (("t2i_teacher", "t2i", "t2i_alignment"), ("edit_teacher", "edit", "edit_accuracy")):
        assert results[name]["artifact_uri"] == grpo[task]["artifact_uri"], name
        assert results[name][key] == grpo[task]["metrics"]["teacher"][key.replace("_", "/", 1)], name


def test_opd_levers_vary_the_named_keys_and_the_shipped_section_is_the_one_within_budget():
    """results/opd_levers.json (`make results/opd_levers.json`): four OPD variants on one chain, one after the
    other at 2 threads, each changing only its named opd keys over the table's section; the shipped opd section
    of configs/shapes.yaml is that section with ``match_2states``, which ran within issue 6's 8 minutes both
    through the CLI and as the pipeline's OPD task."""
    import dataclasses

    from bench.opd_levers import LEVERS_BASE, VARIANTS
    from flowrl.stages.opd import HEADLINE, SECTIONS

    table = json.loads((ROOT / "results" / "opd_levers.json").read_text())["levers"]
    config = load_config(ROOT / "configs" / "shapes.yaml")
    assert table["shared_config_hash"] == config.section_hash(*(s for s in SECTIONS if s != "opd")), "stale"
    assert table["machine"]["cpu_count"] == 2
    assert table["opd_config"]["timesteps_per_trajectory"] == LEVERS_BASE["timesteps_per_trajectory"]
    # keys added since the table was made, at their defaults, are outside its section (and its hash)
    added = {f.name for f in dataclasses.fields(config.opd)
             if f.metadata.get("added") and getattr(config.opd, f.name) == f.default and f.name not in table["opd_config"]}
    shipped = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(config.opd))).items() if k not in added}
    assert {**table["opd_config"], **table["variants"]["match_2states"]["opd"]} == shipped
    assert set(table["variants"]) == set(VARIANTS)
    for name, row in table["variants"].items():
        assert row["opd"] == VARIANTS[name] and row["threads"] == 2 and not row["reused"], name
        for task in ("t2i", "edit"):
            assert abs(row["deltas"][task] - (row["judge"][HEADLINE[task]] - table["base"][HEADLINE[task]])) < 1e-9
        assert [m[0] for m in row["monitor"]] == list(range(0, config.opd.iterations + 1, config.opd.eval_every))
    # what the README claims: the old section over the budget, the shipped one within it, in the CLI and the pipeline
    assert table["variants"]["config"]["wall_s"] > 480.0 >= table["variants"]["match_2states"]["wall_s"]
    pipeline = table["pipeline"]
    assert pipeline["variant"] == "match_2states" and pipeline["threads"] == 2
    assert pipeline["command_wall_s"] <= 480.0 and pipeline["machine"]["cpu_count"] == 2
    # Mix-RL on the same chain (same base, judged the same); the README reports it above the student on the mean
    mix = json.loads((ROOT / "results" / "opd_levers.json").read_text())["mix_rl"]
    m = mix["metrics"]
    assert m["task"] == "mixed" and not mix["reused"]
    assert m["base"] and all(table["base"][k] == v for k, v in m["base"].items())
    assert f"--base {table['inputs']['base']} " in mix["command"]
    student = table["variants"]["match_2states"]["judge"]
    mean = lambda s: (s["t2i/alignment"] + s["edit/accuracy"]) / 2  # noqa: E731
    assert mean(m["teacher"]) > mean(student)


def test_reliability_results_cover_every_fault_and_the_bad_input_battery():
    """results/reliability.json (`make results/reliability.json`): each fault scenario of issue 9 with
    the outcome its tests proved, and the bad-input cases tried and passed."""
    results = json.loads((ROOT / "results" / "reliability.json").read_text())
    scenarios = {row["scenario"]: row for row in results["faults"]}
    for needle in ("GRPO run killed", "OPD run killed", "S3 endpoint cut mid-upload", "S3 endpoint down past",
                   "same artifact version at once", "reward server SIGKILLed during GRPO, never back",
                   "reward server SIGKILLed during GRPO, restarted", "MLflow server unreachable", "NaN or inf",
                   "deleted behind the Flyte cache"):
        match = [row for name, row in scenarios.items() if needle in name]
        assert match, f"no scenario {needle!r} in results/reliability.json"
        assert all(row["verified"] and row["passed"] == len(row["tests"]) > 0 for row in match), match
    assert results["bad_input"]["tried"] >= 30 and results["bad_input"]["passed"] == results["bad_input"]["tried"]


def test_bench_results_hold_pillars_and_arenas_of_every_model():
    """results/bench_shapes.json (`make results/bench_shapes.json`: a full `make run`, then `flowrl bench` on its
    six models), with the report beside it (results/report.md and its PNGs)."""
    from flowrl.bench import PILLARS
    from flowrl.stages.bench import SECTIONS as BENCH_SECTIONS

    results = json.loads((ROOT / "results" / "bench_shapes.json").read_text())
    config = load_config(ROOT / "configs" / "shapes.yaml")
    assert results["config_hash"] == config.section_hash(*BENCH_SECTIONS), "results/bench_shapes.json is stale"
    assert results["machine"]["cpu_count"] == 2
    m = results["metrics"]
    names = {"base", "t2i_teacher", "edit_teacher", "mix_rl", "student", "student_offpolicy"}
    assert set(m["models"]) == names
    for name, entry in m["models"].items():
        p = entry["pillars"]
        for key in (*PILLARS, "overall"):
            assert 0.0 <= p[key] <= 100.0, (name, key)
        assert abs(p["overall"] - sum(p[k] for k in PILLARS) / len(PILLARS)) < 0.01, name
        assert {k.split("/")[1] for k in p if k.startswith("t2i_alignment/")} == {
            "single_object", "two_objects", "counting", "colors", "position", "color_attr"}
        assert {k.split("/")[1] for k in p if k.startswith("edit_accuracy/")} == {"recolor", "remove", "add", "move"}
    for arena in ("t2i", "edit"):
        ratings = m["arenas"][arena]
        assert set(ratings) == names, arena
        assert ratings["base"]["rating"] == 1000.0  # the anchor
        for name, r in ratings.items():
            assert r["ci_low"] <= r["rating"] <= r["ci_high"], (arena, name)
        assert m["battles"][arena] == len(names) * (len(names) - 1) // 2 * m["items"][arena]
    # what the README claims of the committed run: the T2I teacher above base on its pillar, and the student's
    # T2I Elo interval entirely above the base's 1000. The other targets of issue 7 (the edit teacher above base
    # on edit accuracy, the student at or above Mix-RL overall, an edit Elo gain) are missed and reported so.
    pillar = {name: entry["pillars"] for name, entry in m["models"].items()}
    assert pillar["t2i_teacher"]["t2i_alignment"] > pillar["base"]["t2i_alignment"]
    assert m["arenas"]["t2i"]["student"]["ci_low"] > 1000.0
    for f in ("report.md", "report.html"):
        assert (ROOT / "results" / f).is_file()
    for png in re.findall(r"\]\(([^)]+\.png)\)", (ROOT / "results" / "report.md").read_text()):
        assert (ROOT / "results" / png).is_file(), png


def test_second_run_of_the_shapes_pipeline_ran_no_stage():
    """results/rerun_shapes.json (`make results/rerun_shapes.json` after a `make run`): issue 8's second
    `make run` with nothing changed, in at most a minute, every stage a cache hit."""
    results = json.loads((ROOT / "results" / "rerun_shapes.json").read_text())
    assert results["config"] == "configs/shapes.yaml" and results["machine"]["cpu_count"] == 2
    (run,) = results["runs"]
    assert run["stages_run"] == [] and 0 < run["wall_s"] <= 60


def test_edit_reward_prefers_the_ideal_edit_to_a_noop_on_unseen_texts():
    """results/edit_reward_probe.json (`make results/edit_reward_probe.json`), what the README's bench
    section says of it: on both splits the edit reward of the committed reward models scores the ideal
    output above a no-op for every item."""
    results = json.loads((ROOT / "results" / "edit_reward_probe.json").read_text())
    rm = json.loads((ROOT / "results" / "reward_model_shapes.json").read_text())
    assert results["reward_model"] == rm["artifact_uri"] and results["config"] == "configs/shapes.yaml"
    for split in ("train", "bench"):
        kinds = results["splits"][split]
        assert set(kinds) == {"recolor", "remove", "add", "move"}, split
        for kind, row in kinds.items():
            assert row["items"] == results["per_kind"] and row["ideal"] > row["noop"], (split, kind)
            assert row["noop_at_least_ideal"] == 0.0, (split, kind)
