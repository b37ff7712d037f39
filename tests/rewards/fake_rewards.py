"""Small deterministic rewards for the server tests and the benchmark.

The real reward models are large; these stand in for them so the tests show
the server's behaviour (wire format, validation, ordering, latency) and not
a model's. Each is a zero-arg or kwargs factory, loadable with
``--reward NAME=tests.rewards.fake_rewards:<factory>``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flowrl.rewards.base import RewardScores


@dataclass(frozen=True)
class BrightnessReward:
    """Mean brightness plus a per-prompt term, so order and prompts both matter."""

    prompt_weight: float = 0.01
    uses_sources: bool = False
    score_range: tuple[float, float] = (0.0, 100.0)

    def score_components(self, images, prompts, sources=None) -> RewardScores:
        brightness = images.mean(dim=(1, 2, 3))
        prompt_term = self.prompt_weight * torch.tensor([float(len(p)) for p in prompts])
        return RewardScores(total=brightness + prompt_term, components={"brightness": brightness, "prompt": prompt_term})

    def score(self, images, prompts, sources=None) -> torch.Tensor:
        return self.score_components(images, prompts, sources).total


@dataclass(frozen=True)
class SourceSimilarityReward:
    """An edit-style reward: 1 - mean |image - source|; needs the sources."""

    uses_sources: bool = True

    def score_components(self, images, prompts, sources=None) -> RewardScores:
        similarity = 1.0 - (images - sources).abs().mean(dim=(1, 2, 3))
        return RewardScores(total=similarity, components={"identity": similarity})

    def score(self, images, prompts, sources=None) -> torch.Tensor:
        return self.score_components(images, prompts, sources).total


@dataclass(frozen=True)
class FaultyReward:
    """Misbehaves on cue: 'nan' -> NaN score, 'inf' -> inf component, 'big' -> out of range, 'boom' -> raises."""

    score_range: tuple[float, float] = (0.0, 1.0)

    def score_components(self, images, prompts, sources=None) -> RewardScores:
        if any("boom" in p for p in prompts):
            raise RuntimeError("the reward model fell over")
        total = torch.tensor([float("nan") if "nan" in p else 2.0 if "big" in p else 0.5 for p in prompts])
        extra = torch.tensor([float("inf") if "inf" in p else 0.0 for p in prompts])
        return RewardScores(total=total, components={"value": total, "extra": extra})

    def score(self, images, prompts, sources=None) -> torch.Tensor:
        return self.score_components(images, prompts, sources).total


class ConvNetReward:
    """A fixed random conv net: a stand-in with real compute, for the benchmark."""

    def __init__(self, width: int = 32, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.weights = [
            torch.randn(width, 3, 3, 3, generator=generator) / 5.0,
            torch.randn(width, width, 3, 3, generator=generator) / (3.0 * width**0.5),
        ]

    def score_components(self, images, prompts, sources=None) -> RewardScores:
        hidden = torch.relu(torch.nn.functional.conv2d(images, self.weights[0], padding=1, stride=2))
        hidden = torch.relu(torch.nn.functional.conv2d(hidden, self.weights[1], padding=1, stride=2))
        total = torch.sigmoid(hidden.mean(dim=(1, 2, 3)))
        return RewardScores(total=total, components={"conv": total})

    def score(self, images, prompts, sources=None) -> torch.Tensor:
        return self.score_components(images, prompts, sources).total


def brightness(prompt_weight: float = 0.01) -> BrightnessReward:
    return BrightnessReward(prompt_weight=prompt_weight)


def source_similarity() -> SourceSimilarityReward:
    return SourceSimilarityReward()


def faulty() -> FaultyReward:
    return FaultyReward()


def conv_net(width: int = 32) -> ConvNetReward:
    return ConvNetReward(width=width)
