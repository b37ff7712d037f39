"""`flowrl plan`: bad flags are refused before any planning, a stage that fits
no setting makes the command fail after the table, and the Qwen-Image config
plans offline."""

import socket

import pytest

import flowrl.planner
from flowrl.cli import main
from tests.conftest import ROOT

SHAPES = str(ROOT / "configs" / "shapes.yaml")


def run_plan(capsys, *flags: str) -> tuple[int, str, str]:
    code = main(["plan", "--config", SHAPES, *flags])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def no_planning(monkeypatch):
    """Planning is the work a refused flag must never reach."""

    def refuse(*args, **kwargs):
        raise AssertionError("planned despite a bad flag")

    monkeypatch.setattr(flowrl.planner, "plan_table", refuse)


@pytest.mark.bad_input
@pytest.mark.parametrize("margin", ["1.5", "1", "-3", "-0.01", "nan", "inf", "-inf"])
def test_margins_outside_zero_to_one_are_refused(capsys, no_planning, margin):
    # the = form: argparse takes a bare "-inf" for an option
    code, out, err = run_plan(capsys, "--gpus", "2", "--gpu-mem", "80", f"--margin={margin}")
    assert code == 2 and out == ""
    assert err.startswith("flowrl plan: error: --margin: ") and "[0, 1)" in err and "Traceback" not in err


@pytest.mark.bad_input
@pytest.mark.parametrize("gpu_mem", ["nan", "inf", "-inf", "0", "-1"])
def test_non_finite_or_non_positive_gpu_memory_is_refused(capsys, no_planning, gpu_mem):
    code, out, err = run_plan(capsys, "--gpus", "2", f"--gpu-mem={gpu_mem}")
    assert code == 2 and out == ""
    assert err.startswith("flowrl plan: error: --gpu-mem: ") and "finite number > 0" in err


def test_edges_of_the_margin_are_accepted(capsys):
    for margin, gpu_mem in (("0", "1"), ("0.999", "1000")):  # both plan to 1 GiB per GPU
        code, out, _ = run_plan(capsys, "--gpus", "2", "--gpu-mem", gpu_mem, "--margin", margin)
        assert code == 0 and "| grpo |" in out


def test_a_plan_that_fits_exits_zero(capsys):
    code, out, err = run_plan(capsys, "--gpus", "2", "--gpu-mem", "1")
    assert code == 0 and "| grpo |" in out and "| opd |" in out and "does not fit" not in out and err == ""


def test_nothing_fits_prints_the_table_then_fails_naming_the_stages(capsys):
    code, out, err = run_plan(capsys, "--gpus", "1", "--gpu-mem", "0.001")
    assert code == 1
    assert "| grpo |" in out and "| opd |" in out and "does not fit" in out  # the table is still there
    assert err.startswith("flowrl plan: error: no setting fits 1 x 0.001 GiB for grpo, opd")


def test_the_qwen_image_config_plans_offline(capsys, monkeypatch):
    """No network and HF_HUB_OFFLINE=1: the parameter counts come from the shipped specs."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["plan", "--config", str(ROOT / "configs" / "qwen_image.yaml"), "--gpus", "8", "--gpu-mem", "80"])
    out = capsys.readouterr()
    assert code in (0, 1), out.err  # 1: a stage does not fit 8 x 80 GiB (a planning result, not a failure to plan)
    assert "| grpo |" in out.out and "| opd |" in out.out and "Traceback" not in out.err
    assert (code == 1) == ("does not fit" in out.out)
