"""The production bench's pieces that need no model: SSIM against hand-computed
values, the ``bench.scorers`` syntax, and the bench prompt files' check that
training never saw a bench prompt."""

import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from flowrl.bench import ssim
from flowrl.config import BENCH_PILLARS, ConfigError, load_config, pillar_sources
from flowrl.prompt_files import PromptFileError, check_prompt_files, load_bench_prompts
from tests.conftest import write_config

C1, C2 = 0.01**2, 0.03**2


def test_ssim_of_constant_images_is_the_luminance_term():
    # no variance anywhere: the structure term is C2 / C2 = 1, so SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b = (torch.full((1, 3, 16, 16), v, dtype=torch.float64) for v in (0.2, 0.6))
    expected = (2 * 0.2 * 0.6 + C1) / (0.2**2 + 0.6**2 + C1)
    assert ssim(a, b).item() == pytest.approx(expected, rel=1e-9)
    assert ssim(a, a).item() == pytest.approx(1.0, abs=1e-12)


def test_ssim_of_a_two_pixel_pattern_against_a_hand_computed_value():
    # a 1 x 2 image fits a window of one pixel: means are the pixels, variances 0 -> luminance term per pixel
    a = torch.tensor([[[[0.5, 1.0]]]], dtype=torch.float64)
    b = torch.tensor([[[[0.5, 0.0]]]], dtype=torch.float64)
    per_pixel = [(2 * 0.25 + C1) / (0.5 + C1), (0 + C1) / (1 + C1)]
    assert ssim(a, b).item() == pytest.approx(np.mean(per_pixel), rel=1e-9)


def test_ssim_is_symmetric_one_only_for_identical_images_and_falls_with_noise():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 32, 32, generator=g)
    slightly = (image + 0.05 * torch.randn(image.shape, generator=g)).clamp(0, 1)
    very = (image + 0.4 * torch.randn(image.shape, generator=g)).clamp(0, 1)
    assert torch.allclose(ssim(image, slightly), ssim(slightly, image))
    assert torch.allclose(ssim(image, image), torch.ones(2, dtype=torch.float64))
    assert (ssim(image, slightly) < 1).all() and (ssim(image, very) < ssim(image, slightly)).all()
    with pytest.raises(ValueError, match="one shape"):
        ssim(image, image[:, :, :16])


def test_bench_scorers_name_one_valid_source_for_every_pillar():
    sources = pillar_sources(("t2i_alignment=t2i/pairwise", "edit_accuracy=edit/pointwise_alignment",
                              "fidelity=t2i/pointwise_fidelity", "identity=ssim"))
    assert set(sources) == set(BENCH_PILLARS) and sources["identity"] == ("", "ssim")
    assert sources["edit_accuracy"] == ("edit", "pointwise_alignment")
    full = ("t2i_alignment=t2i/a", "edit_accuracy=edit/b", "fidelity=t2i/c", "identity=ssim")
    for entries, message in [
        (full[:3], "no source for pillar 'identity'"),
        (full + ("identity=edit/x",), r"bench.scorers\[4\]: pillar 'identity' is given twice"),
        (("beauty=t2i/a",) + full, r"bench.scorers\[0\]: unknown pillar 'beauty'"),
        (("t2i_alignment=ssim",) + full[1:], "'ssim' measures identity"),
        (("t2i_alignment=edit/a",) + full[1:], r"t2i_alignment is scored by a t2i scorer"),
        (("t2i_alignment=pairwise",) + full[1:], r"expected t2i_alignment=TASK/DIRECTORY"),
        (("t2i_alignment",) + full[1:], r"bench.scorers\[0\]: expected PILLAR=SOURCE"),
    ]:
        with pytest.raises(ConfigError, match=message):
            pillar_sources(entries)


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _files(root, bench_t2i, bench_edit):
    """Filter, annotation and bench files of a qwen_image config; returns the config."""
    pd.DataFrame({"prompt": ["a cat", "a dog", "two birds"], "category": ["animal", "animal", "counting"]}
                 ).to_parquet(root / "t2i.parquet")
    pd.DataFrame({"prompt": ["make it red", "remove the cup"], "category": ["recolor", "remove"],
                  "source_image": [_png(0), _png(1)]}).to_parquet(root / "edit.parquet")
    labels = pd.DataFrame({"task": ["t2i", "edit"], "prompt": ["a red bicycle", "add a hat"]})
    labels.to_parquet(root / "pointwise.parquet")
    labels.to_parquet(root / "pairwise.parquet")
    pd.DataFrame(bench_t2i, columns=["prompt", "category"]).to_parquet(root / "bench_t2i.parquet")
    pd.DataFrame(bench_edit, columns=["prompt", "category"]).assign(
        source_image=[_png(10 + i) for i in range(len(bench_edit))]).to_parquet(root / "bench_edit.parquet")
    path = write_config(
        root, scenario="qwen_image.yaml",
        model={"family": "qwen_image", "qwen_image": {"pretrained": "unused", "height": 32, "width": 48}},
        annotate={"pointwise_path": str(root / "pointwise.parquet"), "pairwise_path": str(root / "pairwise.parquet")},
        filter={"t2i_prompts": str(root / "t2i.parquet"), "edit_prompts": str(root / "edit.parquet")},
        bench={"t2i_prompts": str(root / "bench_t2i.parquet"), "edit_prompts": str(root / "bench_edit.parquet"),
               "t2i_per_category": 2, "edit_per_kind": 1},
    )
    return load_config(path)


BENCH_T2I = [("a fox in snow", "animal"), ("a heron", "animal"), ("an owl at night", "animal"),
             ("three apples", "counting")]
BENCH_EDIT = [("make the sky orange", "recolor"), ("make the car blue", "recolor"), ("remove the lamp", "remove")]


def test_bench_files_give_the_first_items_of_each_category_with_sources_at_the_model_size(tmp_path):
    config = _files(tmp_path, BENCH_T2I, BENCH_EDIT)
    t2i, edit = load_bench_prompts(config, "t2i"), load_bench_prompts(config, "edit")
    assert list(t2i["prompt"]) == ["a fox in snow", "a heron", "three apples"]
    assert list(edit["prompt"]) == ["make the sky orange", "remove the lamp"]
    assert Image.open(io.BytesIO(edit["source_image"][0])).size == (48, 32)
    assert len(t2i.attrs["sha256"]) == 64
    assert check_prompt_files(config) == {"t2i": 3, "edit": 2, "bench_t2i": 3, "bench_edit": 2}


@pytest.mark.parametrize("task, row, prompt, where", [
    ("t2i", 2, "  A   Dog ", "filter.t2i_prompts"),  # case and spacing do not hide a training prompt
    ("t2i", 1, "a red bicycle", "annotate.pointwise_path"),
    ("edit", 0, "remove the cup", "filter.edit_prompts"),
    ("edit", 2, "add a hat", "annotate.pointwise_path"),
])
def test_a_bench_prompt_that_training_sees_is_refused_naming_file_row_and_where(tmp_path, task, row, prompt, where):
    t2i, edit = list(BENCH_T2I), list(BENCH_EDIT)
    items = t2i if task == "t2i" else edit
    items[row] = (prompt, items[row][1])
    config = _files(tmp_path, t2i, edit)
    with pytest.raises(PromptFileError, match=rf"bench.{task}_prompts: .*bench_{task}.parquet row {row}: prompt "
                                              rf".* also occurs in {where}"):
        load_bench_prompts(config, task)
    with pytest.raises(PromptFileError, match=rf"row {row}"):
        check_prompt_files(config)  # the pipeline's first task refuses it too


def test_a_qwen_image_config_without_bench_files_or_with_the_judge_is_refused(tmp_path):
    config = _files(tmp_path, BENCH_T2I, BENCH_EDIT)
    assert config.bench.scorer == "reward_models"
    base = dict(model={"family": "qwen_image", "qwen_image": {"pretrained": "unused"}},
                filter={"t2i_prompts": "a.parquet", "edit_prompts": "b.parquet"})
    with pytest.raises(ConfigError, match="bench.edit_prompts: required when model.family is qwen_image"):
        load_config(write_config(tmp_path / "a", scenario="qwen_image.yaml", **base,
                                 bench={"t2i_prompts": "x.parquet", "edit_prompts": None}))
    with pytest.raises(ConfigError, match="bench.scorer: qwen_image has no judge"):
        load_config(write_config(tmp_path / "b", scenario="qwen_image.yaml", **base, bench={"scorer": "judge"}))
    with pytest.raises(ConfigError, match="unknown pillar 'speed'"):
        load_config(write_config(tmp_path / "c", scenario="qwen_image.yaml", **base,
                                 bench={"scorers": ["speed=t2i/x"]}))


def test_flowrl_bench_refuses_a_leaked_bench_prompt_in_one_line_before_loading_any_model(tmp_path, capsys):
    from flowrl.cli import main

    t2i = [*BENCH_T2I[:3], ("two birds", "counting")]
    _files(tmp_path, t2i, BENCH_EDIT)
    missing = str(tmp_path / "no-such-artifact")  # never fetched: the bench files fail first
    code = main(["bench", "--config", str(tmp_path / "config.yaml"), "--model", f"base={missing}",
                 "--model", f"other={missing}", "--reward-model", missing])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "bench.t2i_prompts: " in err and "row 3: prompt 'two birds' also occurs in filter.t2i_prompts" in err
