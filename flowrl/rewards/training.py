"""Training and evaluating reward models on annotation data.

The same backbone trains either pointwise (cross-entropy on one Likert
column; reward = expected level) or pairwise (Bradley-Terry on the expected
levels of the two images). Evaluation is on a held-out split of prompts:
ordering accuracy on pairs and Spearman correlation with the judge.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

from flowrl.models import CheckpointError
from flowrl.rewards.annotations import decode_png
from flowrl.rewards.augment import augment_batch
from flowrl.rewards.backbone import ScoreBackbone
from flowrl.rewards.losses import bradley_terry_loss, expected_score
from flowrl.rl.engine import TorchEngine
from flowrl.rl.trainer import Checkpoints, LoopSettings, LoopTrainer, TrainResult

PREFERENCE_VALUE = {"a": 1.0, "b": 0.0, "tie": 0.5}


def images_of(column: pd.Series) -> torch.Tensor:
    """PNG bytes -> float [N, 3, H, W] in [0, 1]."""
    arrays = np.stack([decode_png(b) for b in column])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255.0


@dataclass(frozen=True)
class PointwiseData:
    images: torch.Tensor  # [N, 3, H, W]
    sources: torch.Tensor | None  # [N, 3, H, W] for edits
    prompts: list[str]
    labels: torch.Tensor  # [N] levels 1..5
    rationales: list[str] | None  # the annotators' reasons, when the data has them

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, column: str) -> "PointwiseData":
        edits = frame["source_image"].notna().all() and len(frame) > 0
        has_rationales = "rationale" in frame.columns and frame["rationale"].notna().all() and len(frame) > 0
        return cls(
            images=images_of(frame["image"]),
            sources=images_of(frame["source_image"]) if edits else None,
            prompts=list(frame["prompt"]),
            labels=torch.tensor(frame[column].to_numpy(), dtype=torch.long),
            rationales=list(frame["rationale"]) if has_rationales else None,
        )


@dataclass(frozen=True)
class PairwiseData:
    images_a: torch.Tensor
    images_b: torch.Tensor
    sources: torch.Tensor | None
    prompts: list[str]
    preference: torch.Tensor  # [N] 1 = a, 0 = b, 0.5 = tie

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> "PairwiseData":
        edits = frame["source_image"].notna().all() and len(frame) > 0
        return cls(
            images_a=images_of(frame["image_a"]),
            images_b=images_of(frame["image_b"]),
            sources=images_of(frame["source_image"]) if edits else None,
            prompts=list(frame["prompt"]),
            preference=torch.tensor([PREFERENCE_VALUE[p] for p in frame["preference"]]),
        )


def _unit_hash(seed: int, key: str) -> float:
    """A deterministic uniform draw in [0, 1) per (seed, key)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_keys(frame: pd.DataFrame) -> pd.Series:
    """What a held-out split must not cut: the ``group`` column (a prompt
    instance with all its images) where the data has it, else the prompt."""
    if "group" in frame.columns and frame["group"].notna().all():
        return frame["group"].astype(str)
    return frame["prompt"].astype(str)


@dataclass(frozen=True)
class Split:
    train: pd.DataFrame
    heldout: pd.DataFrame  # new prompt instances (new images) of prompts also seen in training
    unseen: pd.DataFrame  # prompts no training row has


def is_unseen_prompt(prompt: str, unseen_prompt_fraction: float, seed: int) -> bool:
    """Whether the split rule holds ``prompt`` out as an unseen prompt (whatever data holds it)."""
    return _unit_hash(seed, "prompt:" + str(prompt)) < unseen_prompt_fraction


def split_annotations(frame: pd.DataFrame, heldout_fraction: float, unseen_prompt_fraction: float, seed: int) -> Split:
    """Three disjoint parts. A prompt text goes to ``unseen`` with probability
    ``unseen_prompt_fraction``; of the rest, a group goes to ``heldout`` with
    probability ``heldout_fraction``. The draw depends only on (seed, key), so
    the pointwise and pairwise frames of one dataset split the same way. When
    no group's draw falls under the fraction (tiny data), the group with the
    lowest draw is held out."""
    unseen = frame["prompt"].astype(str).map(lambda k: is_unseen_prompt(k, unseen_prompt_fraction, seed))
    draws = split_keys(frame).map(lambda k: _unit_hash(seed, "group:" + k))
    held = (draws < heldout_fraction) & ~unseen
    rest = draws[~unseen]
    if not held.any() and rest.nunique() > 1:  # small data: hold out at least the group with the lowest draw
        held = (draws == rest.min()) & ~unseen
    part = lambda mask: frame[mask.to_numpy()].reset_index(drop=True)
    return Split(part(~unseen & ~held), part(held), part(unseen))


def _rows(n: int, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, n, (batch_size,), generator=gen)


def _sub(x: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    return None if x is None else x[idx]


def pointwise_step_loss(backbone: ScoreBackbone, data: PointwiseData, idx: torch.Tensor,
                        generator: torch.Generator | None = None, augment: Sequence[str] = (),
                        allowed: Callable[[str], bool] | None = None) -> torch.Tensor:
    """The pointwise loss on rows ``idx``; with ``augment`` kinds (:mod:`flowrl.rewards.augment`), each
    row is first replaced by a random label-preserving variant drawn from ``generator``, whose prompt
    ``allowed`` accepts."""
    rationales = None if data.rationales is None else [data.rationales[i] for i in idx]
    images, prompts, sources = data.images[idx], [data.prompts[i] for i in idx], _sub(data.sources, idx)
    if augment:
        if generator is None:
            raise ValueError("augmented rows need the trainer's random generator")
        images, prompts, sources = augment_batch(images, prompts, sources, generator, augment, allowed)
    return backbone.training_loss(images, prompts, rationales, data.labels[idx], sources)


def pairwise_step_loss(backbone: ScoreBackbone, data: PairwiseData, idx: torch.Tensor) -> torch.Tensor:
    prompts = [data.prompts[i] for i in idx]
    src = _sub(data.sources, idx)
    reward_a = expected_score(backbone.level_logits(data.images_a[idx], prompts, src))
    reward_b = expected_score(backbone.level_logits(data.images_b[idx], prompts, src))
    return bradley_terry_loss(reward_a, reward_b, data.preference[idx])


class ScorerTrainer(LoopTrainer):
    """Reward-model training on the shared loop: one iteration is one AdamW
    step on ``step_loss(row indices)``, rows drawn with replacement from one
    torch stream seeded once (its state is kept in checkpoints, so a resumed
    run draws what the uninterrupted one would have). The tracker gets the
    loss every ``log_every`` steps, at the step's index. With ``pass_generator``, ``step_loss`` is
    called as ``step_loss(rows, generator)`` and may draw from that same stream (augmentations)."""

    def __init__(self, backbone: ScoreBackbone, step_loss: Callable[[torch.Tensor], torch.Tensor], n_rows: int, *,
                 steps: int, batch_size: int, lr: float, seed: int, weight_decay: float = 0.01,
                 grad_clip: float = 1.0, log_every: int = 50, checkpoints: Checkpoints | None = None,
                 checkpoint_every: int | None = None, config_hash: str = "", name: str = "reward_model",
                 pass_generator: bool = False):
        self.gen = torch.Generator().manual_seed(seed)
        engine = TorchEngine(backbone, lr=lr, weight_decay=weight_decay, grad_clip=grad_clip)
        settings = LoopSettings(iterations=steps, eval_every=steps, checkpoint_every=checkpoint_every or steps,
                                name=name, tracked="train/loss")
        super().__init__(None, backbone, engine, None, settings, checkpoints=checkpoints, config_hash=config_hash)
        self.step_loss, self.n_rows, self.batch_size, self.log_every = step_loss, n_rows, batch_size, log_every
        self.pass_generator = pass_generator

    def step(self, iteration: int) -> dict[str, float]:
        rows = _rows(self.n_rows, self.batch_size, self.gen)
        loss = self.step_loss(rows, self.gen) if self.pass_generator else self.step_loss(rows)
        self.engine.zero_grad()
        self.engine.backward(loss)
        self.engine.step()
        return {"train/loss": loss.item()}

    def postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{metrics['train/loss']:.4f}"}

    def extra_state(self) -> dict:
        return {"torch_generator": self.gen.get_state()}

    def load_extra_state(self, extra: dict) -> None:
        try:
            self.gen.set_state(extra["torch_generator"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{self.loop.name} checkpoint: unusable random-stream state ({str(exc)[:200]})"
                                  ) from None

    def train(self, log_metrics: Callable[[dict[str, float], int], None] | None = None, progress: bool = False,
              stop_after: int | None = None) -> TrainResult:
        every = self.log_every

        def logged(metrics: dict[str, float], done: int) -> None:
            if (done - 1) % every == 0:  # the loop counts the steps done; the tracker gets the step's index
                log_metrics({"train/loss": metrics["train/loss"]}, done - 1)

        return super().train(logged if log_metrics is not None else None, progress, stop_after)

    def final_weights(self) -> dict[str, torch.Tensor]:
        """Nothing: the backbone is trained in place and holds the weights (no copy of a VLM's)."""
        return {}

    def losses(self) -> list[float]:
        """The loss of every step so far (a resumed run's from its checkpoint on)."""
        return [entry["train/loss"] for entry in self.state.history]


def fit(
    backbone: ScoreBackbone,
    step_loss: Callable[[torch.Tensor], torch.Tensor],
    n_rows: int,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    weight_decay: float = 0.01,
    grad_clip: float = 1.0,
    log: Callable[[dict[str, float], int], None] | None = None,
) -> list[float]:
    """AdamW on ``step_loss(row indices)`` (:class:`ScorerTrainer` without checkpoints); returns the
    loss per step."""
    trainer = ScorerTrainer(backbone, step_loss, n_rows, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                            weight_decay=weight_decay, grad_clip=grad_clip)
    trainer.train(log, progress=False)
    return trainer.losses()


@torch.no_grad()
def rewards_of(
    backbone: ScoreBackbone, images: torch.Tensor, prompts: list[str], sources: torch.Tensor | None, batch: int = 256
) -> torch.Tensor:
    """Expected levels [N] in batches."""
    out = []
    for s in range(0, len(prompts), batch):
        src = None if sources is None else sources[s : s + batch]
        out.append(expected_score(backbone.level_logits(images[s : s + batch], prompts[s : s + batch], src)))
    return torch.cat(out)


def ordering_accuracy(reward_a: torch.Tensor, reward_b: torch.Tensor, preference: torch.Tensor) -> float:
    """Share of non-tied pairs the rewards order as ``preference`` does."""
    decided = preference != 0.5
    if not decided.any():
        raise ValueError("no decided pairs to score")
    agree = (reward_a > reward_b) == (preference == 1.0)
    return float(agree[decided].float().mean())


def spearman(scores: torch.Tensor, reference: np.ndarray) -> float:
    return float(spearmanr(scores.float().cpu().numpy(), reference).statistic)


def spearman_ceiling(reference: np.ndarray, seed: int = 0) -> float:
    """The Spearman correlation a perfect scorer reaches against ``reference``
    when it must break the reference's ties (a continuous score does): with
    most images tied at the top, as for fidelity, it is far below 1."""
    values = np.asarray(reference, dtype=np.float64)
    scale = np.ptp(values) or 1.0
    jitter = np.random.default_rng(seed).uniform(0.0, 1e-9 * scale, size=values.shape)
    return float(spearmanr(values + jitter, values).statistic)


def label_reliability(labels: Sequence[Sequence[float]]) -> tuple[float, float]:
    """(split-half Spearman r of two labels of the same image, mean labels per image) over the images
    with at least two labels: how far two annotators agree on one image."""
    pairs = np.array([row[:2] for row in labels if len(row) >= 2], dtype=np.float64)
    if len(pairs) < 3:
        raise ValueError(f"{len(pairs)} images with two labels or more; the annotators' agreement needs 3")
    return float(spearmanr(pairs[:, 0], pairs[:, 1]).statistic), float(np.mean([len(row) for row in labels]))


def label_spearman_ceiling(labels: Sequence[Sequence[float]]) -> float:
    """What a perfect scorer (one that knows each image's expected label) reaches in Spearman with the
    images' mean labels, estimated from the annotators' agreement: with split-half r of single labels and
    k labels per image, the mean label's reliability is k r / (1 + (k - 1) r) (Spearman-Brown) and its
    correlation with the expected label the square root of that. 0 when the labels do not agree at all."""
    r, k = label_reliability(labels)
    if not np.isfinite(r) or r <= 0:
        return 0.0
    return float(np.sqrt(k * r / (1.0 + (k - 1.0) * r)))
