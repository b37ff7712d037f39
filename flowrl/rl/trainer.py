"""Trainer machinery shared by GRPO and OPD: checkpoints, resume, the
hacking monitor (the EMA is :class:`flowrl.pretrain.EMA`).

Checkpoints are small artifacts of their own, committed through the
artifact store (files first, manifest last), so a checkpoint is either
complete or invisible: stage ``<stage>.checkpoints``, version
``<run version>-<iteration>``. ``latest`` finds the newest complete one of a
run; a killed run restarts from it. Every random draw of an iteration is
seeded from (seed, iteration), so a resumed run replays exactly what the
uninterrupted one did.
"""

from __future__ import annotations

import io
import json
import logging
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from flowrl.pretrain import EMA
from flowrl.storage import ArtifactError, ArtifactStore, fetch

log = logging.getLogger(__name__)

_WEIGHTS, _EMA, _TRAINER, _STATE = "model.safetensors", "ema.safetensors", "trainer.pt", "state.json"


def seeded_generator(seed: int, iteration: int, stream: int = 0) -> torch.Generator:
    """The torch generator of one iteration's draws (``stream`` tells apart several per iteration)."""
    state = np.random.SeedSequence([seed, iteration, stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


@dataclass
class TrainerState:
    """What a resumed run needs besides the weights and optimizer."""

    iteration: int = 0  # iterations completed
    history: list[dict] = field(default_factory=list)  # one metrics dict per iteration
    monitor: list[dict] = field(default_factory=list)  # one dict per held-out evaluation
    stopped: str | None = None  # why the run stopped early, if it did


class Checkpoints:
    """Complete checkpoints of one run (``stage``, ``version``) in an artifact store."""

    def __init__(self, store: ArtifactStore, stage: str, version: str):
        self.store, self.stage, self.version = store, f"{stage}.checkpoints", version

    def _name(self, iteration: int) -> str:
        return f"{self.version}-{iteration:07d}"

    def save(
        self,
        state: TrainerState,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        ema: EMA | None,
        config_hash: str,
    ) -> str:
        with tempfile.TemporaryDirectory(prefix="flowrl-ckpt-") as tmp:
            tmp = Path(tmp)
            save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, tmp / _WEIGHTS)
            if ema is not None:
                save_file({k: v.contiguous() for k, v in ema.shadow.state_dict().items()}, tmp / _EMA)
            torch.save({"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}, tmp / _TRAINER)
            (tmp / _STATE).write_text(json.dumps(state.__dict__, sort_keys=True))
            return self.store.commit(
                tmp, stage=self.stage, version=self._name(state.iteration), config_hash=config_hash,
                inputs={"run": self.version},
            )

    def latest(self) -> str | None:
        """URI of the newest complete checkpoint of this run, or None."""
        root = f"{self.store._root_path.rstrip('/')}/{self.stage}"
        if not self.store.fs.exists(root):
            return None
        pattern = re.compile(re.escape(self.version) + r"-(\d{7})$")
        found = []
        for path in self.store.fs.ls(root, detail=False):
            match = pattern.match(path.rstrip("/").rsplit("/", 1)[-1])
            if match and self.store.exists(self.stage, match.group(0)):
                found.append((int(match.group(1)), match.group(0)))
        return self.store.uri(self.stage, max(found)[1]) if found else None

    def load(
        self, uri: str, module: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: EMA | None
    ) -> TrainerState:
        local = fetch(uri, fs=self.store.fs) if "://" in uri else fetch(uri)
        module.load_state_dict(load_file(local / _WEIGHTS), strict=True)
        if ema is not None:
            if not (local / _EMA).is_file():
                raise ArtifactError(f"{uri}: the run uses EMA but the checkpoint has no {_EMA}")
            ema.shadow.load_state_dict(load_file(local / _EMA), strict=True)
        trainer = torch.load(io.BytesIO((local / _TRAINER).read_bytes()), weights_only=True)
        optimizer.load_state_dict(trainer["optimizer"])
        torch.set_rng_state(trainer["torch_rng"])
        return TrainerState(**json.loads((local / _STATE).read_text()))


@dataclass
class HackingMonitor:
    """Reward hacking: the training reward keeps rising while the held-out
    score falls. Fires when the held-out score is more than ``threshold``
    below its best so far while the training reward is above what it was
    when that best was measured (before any training reward exists, e.g. at
    iteration 0, the first one seen stands in)."""

    threshold: float
    best_score: float = float("-inf")
    reward_at_best: float | None = None

    def check(self, heldout: float, reward: float | None) -> str | None:
        if heldout > self.best_score:
            self.best_score, self.reward_at_best = heldout, reward
            return None
        if self.reward_at_best is None:
            self.reward_at_best = reward
            return None
        if reward is not None and heldout < self.best_score - self.threshold and reward > self.reward_at_best:
            return (
                f"reward hacking: the held-out score fell to {heldout:.3f} from its best {self.best_score:.3f} "
                f"while the training reward rose to {reward:.3f} from {self.reward_at_best:.3f}"
            )
        return None
