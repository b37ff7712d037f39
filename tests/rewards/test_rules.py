"""The rule-based scorer type: JPEG compressibility, from the config through the registry."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from flowrl.config import load_config
from flowrl.rewards.registry import load_rewards, scorer_types
from flowrl.rewards.rules import JpegCompressibility, jpeg_kilobytes
from tests.conftest import write_config


def test_the_reward_is_the_negated_jpeg_size_in_kilobytes():
    rng = np.random.default_rng(0)
    flat = np.full((32, 32, 3), 128, np.uint8)
    noisy = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, format="JPEG", quality=95)
    assert jpeg_kilobytes(noisy) == len(buffer.getvalue()) / 1000
    images = torch.from_numpy(np.stack([flat, noisy])).permute(0, 3, 1, 2).float() / 255
    scores = JpegCompressibility().score(images, ["a", "b"])
    assert scores[0] > scores[1] and scores[1] == pytest.approx(-jpeg_kilobytes(noisy), abs=1e-4)
    assert torch.equal(JpegCompressibility(sign=-1).score(images, ["a", "b"]), -scores)
    with pytest.raises(ValueError, match="quality"):
        JpegCompressibility(quality=100)


def test_a_rule_component_loads_from_the_config_without_any_artifact(tmp_path):
    assert "jpeg_compressibility" in scorer_types()
    config = load_config(write_config(tmp_path, rewards={"t2i": [
        {"name": "compressibility", "scorer": "jpeg_compressibility", "weight": 1.0}]}))
    composite = load_rewards(config, str(tmp_path / "no-such-artifact"), "t2i")
    images = torch.rand(3, 3, 16, 16)
    total = composite.score(images, ["a square", "a circle and a triangle", "four circles"])
    assert total.shape == (3,) and torch.all(total < 0)
