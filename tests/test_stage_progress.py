"""Every stage shows progress while it runs (unless told not to) and logs one summary line with its
headline metrics when it ends, on the CLI as from Python."""

import inspect
import logging
import re

import pytest

from flowrl.cli import main
from flowrl.stages.common import headline_metrics, stage_summary
from flowrl.stages.registry import STAGES
from tests.conftest import write_config

SUMMARY = "flowrl.stages.common"


def _last_line(out: str) -> str:
    return out.strip().splitlines()[-1]


@pytest.fixture
def tiny(tmp_path):
    """The smoke config, smaller still: two base steps and one held-out item per category."""
    return str(write_config(tmp_path, base={"steps": 2, "warmup_steps": 1},
                            eval={"t2i_per_category": 1, "edit_per_kind": 1},
                            reward_model={"steps": 3, "easy_steps": 2}))


def test_every_stage_takes_progress_and_the_cli_passes_it():
    for stage in STAGES:
        assert stage.progress, f"{stage.name}: the registry says it shows no progress"
        parameter = inspect.signature(stage.run_function()).parameters.get("progress")
        assert parameter is not None and parameter.default is True, stage.name


def test_bars_and_summaries_on_the_cli_and_none_with_no_progress(tiny, capsys, caplog):
    caplog.set_level(logging.INFO, logger=SUMMARY)
    assert main(["base", "--config", tiny, "--no-tracking", "--no-progress"]) == 0
    out = capsys.readouterr()
    base = _last_line(out.out)
    assert not re.search(r"base: +\d+%", out.err)  # --no-progress: no bar
    assert re.search(r"stage base done in \d+ s: t2i/alignment [-\d.e]+, edit/accuracy", caplog.text)

    caplog.clear()
    assert main(["annotate", "--config", tiny, "--no-tracking", "--base", base]) == 0
    out = capsys.readouterr()
    annotations = _last_line(out.out)
    assert re.search(r"annotate: model samples: +100%", out.err) and re.search(r"annotate: labels: +100%", out.err)
    assert re.search(r"stage annotate done in \d+ s: t2i/pointwise_rows \d+", caplog.text)

    caplog.clear()
    assert main(["reward-model", "--config", tiny, "--no-tracking", "--annotations", annotations]) == 0
    err = capsys.readouterr().err
    for name in ("t2i/pointwise_alignment", "t2i/pointwise_quality", "t2i/pairwise", "edit/pointwise_alignment"):
        assert re.search(re.escape(name) + r": +100%", err), f"no bar for {name}"  # one bar per scorer
    summary = re.search(r"stage reward_model done in \d+ s: .*", caplog.text)
    assert summary and "t2i/pointwise_alignment/spearman" in summary[0] and "edit/pairwise/pairwise_accuracy" in summary[0]

    caplog.clear()  # the same stage with another seed (a new version), without bars
    assert main(["annotate", "--config", tiny, "--no-tracking", "--no-progress", "--base", base,
                 "--set", "annotate.seed=7"]) == 0
    assert "annotate:" not in capsys.readouterr().err
    assert "stage annotate done in" in caplog.text

    caplog.clear()  # nothing to run: the summary says so
    assert main(["annotate", "--config", tiny, "--no-tracking", "--base", base]) == 0
    assert "stage annotate reused: t2i/pointwise_rows" in caplog.text and annotations in caplog.text


def test_headline_metrics_pick_each_stages_numbers_in_order():
    metrics = {"t2i": {"pointwise_alignment": {"spearman": 0.8712, "pairwise_accuracy": 0.9, "train_s": 3.0},
                       "pairwise": {"pairwise_accuracy": 0.7}},
               "edit": {"pointwise_alignment": {"spearman": 0.5, "pairwise_accuracy": 0.6}},
               "skipped_rows": {"pointwise": 0, "pairwise": 0}}
    assert list(headline_metrics("reward_model", metrics)) == [
        "edit/pointwise_alignment/spearman", "t2i/pointwise_alignment/spearman",
        "edit/pointwise_alignment/pairwise_accuracy", "t2i/pointwise_alignment/pairwise_accuracy",
        "t2i/pairwise/pairwise_accuracy", "skipped_rows/pairwise", "skipped_rows/pointwise"]
    line = stage_summary("grpo_edit", {"base": {"edit": {"accuracy": 0.25}}, "teacher": {"edit": {"accuracy": 0.5}},
                                       "iterations": 4, "note": "text"}, 312.4, "/a/grpo_edit/1")
    assert line == ("stage grpo_edit done in 312 s: base/edit/accuracy 0.25, teacher/edit/accuracy 0.5, "
                    "iterations 4 (/a/grpo_edit/1)")  # counts as integers, text left out
    assert stage_summary("base", {"parameters": 74299.0, "fidelity": 1.234567e-5}, 2.0) == (
        "stage base done in 2 s: fidelity 1.235e-05, parameters 74299")
    assert stage_summary("bench", {}, None) == "stage bench reused: no headline metrics"
