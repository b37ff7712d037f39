"""The committed results of the GRPO ablation tables and curves (results/ beside this file) match configs/shapes.yaml and
hold what this study's README.md says of them; each test names the make target that re-measures its file.
Run by `make experiments-test`, not by `make test`: a changed default makes them stale, not the product wrong.
"""

import json
from pathlib import Path

import pytest

from flowrl.config import load_config

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "grpo_ablations" / "results"


def _name(uri: str) -> str:
    """An artifact URI's last part (its version), whichever root it was written under."""
    return uri.rstrip("/").rsplit("/", 1)[-1]


def _current_table(file: str, name: str, variants: dict, task: str = "t2i") -> tuple[dict, object]:
    """The ``task`` table of ``results/<file>`` made by ``grpo_ablations.py --table <name>`` with exactly
    the table's variants, and on the grpo and filter config of configs/shapes.yaml (else it is stale)."""
    from flowrl.stages.grpo import SECTIONS as GRPO_SECTIONS

    table = json.loads((RESULTS / file).read_text())[task]
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
    iterations = grpo_keys.get("iterations", config.grpo.loop.iterations)
    eval_every = grpo_keys.get("eval_every", config.grpo.loop.eval_every)
    assert [m[0] for m in entry["monitor"]] == list(range(0, iterations + 1, eval_every)), name


def test_grpo_ablations_come_from_the_committed_grpo_inputs():
    """grpo_ablations.json (`make experiments/grpo_ablations/results/grpo_ablations.json`): the four variants of the issue,
    on the base, reward models and curated prompts of results/grpo_shapes.json, each variant changing
    only its named grpo keys."""
    from flowrl.stages.grpo import SECTIONS as GRPO_SECTIONS

    table = json.loads((RESULTS / "grpo_ablations.json").read_text())["t2i"]
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
    """grpo_levers.json (`make experiments/grpo_ablations/results/grpo_levers.json`): the prompt-distribution levers on the
    base and reward models of results/grpo_shapes.json, each variant changing only its named keys; the
    per-category filter keeps prompts of every category."""
    from experiments.grpo_ablations.grpo_ablations import LEVERS, split_variant

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
    """grpo_epochs.json (`make experiments/grpo_ablations/results/grpo_epochs.json`): the levers with 2 and 4 PPO epochs. Its
    artifacts may be newer versions of the same stages (a stage's version includes its code), so the base
    is checked by what the judge measures of it: the same as in results/grpo_shapes.json."""
    from experiments.grpo_ablations.grpo_ablations import EPOCHS, split_variant

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
    """experiments/grpo_ablations/results/grpo_curve.json, grpo_kl_long_curve.json and grpo_trainable_long_*_curve.json (`make experiments/grpo_ablations/results/<curve>`;
    the trainable ones from `make experiments/grpo_ablations/results/grpo_trainable_long.json`): a long T2I run (experiments/grpo_ablations/results/grpo_long.json: the
    levers, 800 iterations; grpo_kl_long.json: the first 30 % window with KL 0.3, 800; grpo_trainable_long.json:
    two trainable subsets, 600), judged at the base and every 100 iterations. Its base is the chain of the machine that ran it, so it is compared with its
    own base only: the curve starts at the table's base and ends at the teacher the stage judged, with the
    same held-out sets."""
    from experiments.grpo_ablations import grpo_ablations
    from experiments.grpo_ablations.grpo_ablations import split_variant

    specs = grpo_ablations.TABLES[name]
    long, _ = _current_table(table_file, name, specs)
    curve = json.loads((RESULTS / curve_file).read_text())
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
    assert (RESULTS / curve_file).with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_the_kl_long_run_replays_the_400_iteration_kl_run_up_to_iteration_400():
    """The 800-iteration KL 0.3 run differs from hold_fidelity's first_30pct_kl03 only in its length, and
    nothing before iteration 400 depends on the length: its curve at 400 is that run's final judge."""
    hold = json.loads((RESULTS / "grpo_hold_fidelity.json").read_text())["t2i"]
    curve = json.loads((RESULTS / "grpo_kl_long_curve.json").read_text())
    (at_400,) = [p for p in curve["points"] if p["iteration"] == 400]
    judge = hold["variants"]["first_30pct_kl03"]["judge"]
    for key in ("t2i/alignment", "fidelity", "t2i/alignment/color_attr", "t2i/alignment/position"):
        assert at_400[key] == pytest.approx(judge[key], abs=1e-4), key


def test_grpo_windows_come_from_the_chain_of_the_long_run():
    """grpo_windows.json (`make experiments/grpo_ablations/results/grpo_windows.json`): the T2I levers for 400 iterations with
    the trained steps from four windows of the schedule and with groups of 16, on the base and reward models
    of experiments/grpo_ablations/results/grpo_long.json; each variant changes only its named keys. (``first_half`` is the long run's
    config stopped at 400, but on one thread instead of two: float sums in another order, other weights.)"""
    from experiments.grpo_ablations.grpo_ablations import WINDOWS, split_variant

    table, config = _current_table("grpo_windows.json", "windows", WINDOWS)
    long = json.loads((RESULTS / "grpo_long.json").read_text())["t2i"]
    curve = json.loads((RESULTS / "grpo_curve.json").read_text())
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
    """experiments/grpo_ablations/results/grpo_ema.json, grpo_hold_fidelity.json, grpo_kl_long.json, grpo_kl03_levers.json and
    grpo_trainable.json (`make experiments/grpo_ablations/results/<file>`): the
    windows table's first 30 % variant with only the named grpo keys (or reward weights) changed, on the same
    base, reward models and curated prompts as experiments/grpo_ablations/results/grpo_windows.json."""
    from experiments.grpo_ablations import grpo_ablations
    from experiments.grpo_ablations.grpo_ablations import WINDOWS, split_variant

    specs = grpo_ablations.TABLES[name]
    table, config = _current_table(file, name, specs)
    windows = json.loads((RESULTS / "grpo_windows.json").read_text())["t2i"]
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
    """grpo_trainable_long.json (`make experiments/grpo_ablations/results/grpo_trainable_long.json`): the windows table's first 30 %
    variant with only kl_coef, trainable, lr and iterations changed, two subsets (the trainable table's attention +
    MLPs at lr 2e-4, and attention alone at the same lr and KL) for 600 iterations on one thread. Its chain is the
    one `make` rebuilt on 2026-12-04 (a new base: the headline base score is the windows chain's 0.513, its
    categories are not), so its deltas are read against its own base only."""
    from experiments.grpo_ablations.grpo_ablations import TRAINABLE, TRAINABLE_LONG, WINDOWS, split_variant

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
    """grpo_edit_window.json (`make experiments/grpo_ablations/results/grpo_edit_window.json`): the edit levers with the T2I
    tables' best window (K = 2 of the first 30 %) and KL 0.3 for 400 iterations, on the base and reward
    models of experiments/grpo_ablations/results/grpo_windows.json; its edit base is the curve's iteration 0 (same base, same held-out
    edits, same sampler)."""
    from experiments.grpo_ablations.grpo_ablations import EDIT_LEVERS, EDIT_WINDOW, split_variant

    table, config = _current_table("grpo_edit_window.json", "edit_window", EDIT_WINDOW, task="edit")
    windows = json.loads((RESULTS / "grpo_windows.json").read_text())["t2i"]
    curve = json.loads((RESULTS / "grpo_curve.json").read_text())
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
    """grpo_cast_rm.json (`make experiments/grpo_ablations/results/grpo_cast_rm.json`): the first 30 % window with KL 0.3 (as in
    experiments/grpo_ablations/results/grpo_hold_fidelity.json) and with KL 0.1 (as in experiments/grpo_ablations/results/grpo_windows.json), on the same base but on
    reward models whose annotation data also held colour casts: other reward models and curated prompts, the
    same base judged the same."""
    from experiments.grpo_ablations.grpo_ablations import CAST_RM, HOLD_FIDELITY, WINDOWS, split_variant

    table, config = _current_table("grpo_cast_rm.json", "cast_rm", CAST_RM)
    windows = json.loads((RESULTS / "grpo_windows.json").read_text())["t2i"]
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
