"""The study's config and summary on hand-made bench results (its measured results are the README's)."""

from pathlib import Path

import pytest

from experiments.mixrl_vs_student.compare import summary, verdict, write_config
from flowrl.config import load_config


def _gain(delta, low, high):
    return {"delta": delta, "ci_low": low, "ci_high": high, "stderr": 0.02}


def _bench():
    models = ("base", "t2i_teacher", "edit_teacher", "student", "mix_rl", "student_offpolicy")
    return {
        "command": "flowrl bench ...", "code_version": "c", "config_hash": "h", "machine": {"cpu_count": 2},
        "metrics": {
            "bench_version": "b",
            "gains_bootstrap": {"confidence": 0.95},
            "gains": {m: {"t2i_alignment": _gain(0.1, 0.05, 0.15)} for m in models[1:]},
            "two_task": {"means": {m: 0.5 for m in models},
                         "differences": {"student-mix_rl": _gain(0.04, 0.01, 0.07),
                                         "mix_rl-student_offpolicy": _gain(0.05, 0.02, 0.08),
                                         "student-student_offpolicy": _gain(0.01, -0.02, 0.04)}},
        },
    }


def test_summary_reads_each_contrast_in_either_order_and_says_which_way_it_fell():
    out = summary(_bench())
    assert out["contrasts"]["student-mix_rl"]["delta"] == 0.04
    flipped = out["contrasts"]["student_offpolicy-mix_rl"]
    assert (flipped["delta"], flipped["ci_low"], flipped["ci_high"]) == (-0.05, -0.08, -0.02)
    assert out["verdicts"] == [
        "student above mix_rl: +0.040 [+0.010, +0.070]",
        "student_offpolicy below mix_rl: -0.050 [-0.080, -0.020]",
        "student and student_offpolicy not told apart: +0.010 [-0.020, +0.040]",
    ]
    assert verdict("a", "b", _gain(0.0, 0.0, 0.0)).startswith("a and b not told apart")


def test_a_missing_model_is_named():
    bench = _bench()
    del bench["metrics"]["two_task"]["differences"]["student-mix_rl"]
    with pytest.raises(KeyError, match="'student' / 'mix_rl'"):
        summary(bench)


def test_the_config_is_the_default_with_both_branches_on(tmp_path):
    out = tmp_path / "config.yaml"
    write_config(Path("configs/shapes.yaml"), out)
    config, default = load_config(out), load_config("configs/shapes.yaml")
    assert config.pipeline.mix_rl and config.pipeline.offpolicy_ablation
    assert not default.pipeline.mix_rl
    sections = ("base", "annotate", "reward_model", "rewards", "filter", "grpo", "opd", "bench")
    assert config.section_hash(*sections) == default.section_hash(*sections)
