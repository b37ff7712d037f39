"""Trainer machinery shared by GRPO and OPD: the iteration loop
(:class:`LoopTrainer`: progress bar, tracker metrics, held-out monitor,
checkpoints, resume, early stop), checkpoints as artifacts, and the
hacking monitor (the EMA is :class:`flowrl.rl.ema.EMA`).

Checkpoints are small artifacts of their own, committed through the
artifact store (files first, manifest last), so a checkpoint is either
complete or invisible: stage ``<stage>.checkpoints``, version
``<run version>-<iteration>``. ``latest`` finds the newest complete one of a
run; a killed run restarts from it. Every random draw of an iteration is
seeded from (seed, iteration), so a resumed run replays exactly what the
uninterrupted one did. The plain engine's checkpoints hold the full weights
and optimizer state (rank 0 writes them); a ZeRO engine's are sharded, one
file per rank in the same artifact (docs/checkpoints.md).
"""

from __future__ import annotations

import abc
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from flowrl.rl.ema import EMA
from flowrl.rl.distributed import barrier, broadcast, dist_info
from flowrl.rl.engine import ShardedEMA, TorchEngine, ZeroEngine
from flowrl.models import CheckpointError
from flowrl.rl.shards import (SHARD_FORMAT, SHARDED, SafetensorsWriter, ShardError, consolidate, read_layout,
                              read_trainer_file, shard_name)
from flowrl.storage import ArtifactError, ArtifactStore, fetch, read_manifest

log = logging.getLogger(__name__)

_WEIGHTS, _EMA, _TRAINER, _STATE = "model.safetensors", "ema.safetensors", "trainer.pt", "state.json"
# where the ranks of a ZeRO run write their checkpoint shards before rank 0 commits them (default: the
# system's temporary directory, which the ranks of one node share; ranks on several nodes need a
# directory they all see)
STAGING_ENV = "FLOWRL_CHECKPOINT_STAGING"


class TrainingStopped(RuntimeError):
    """An iteration could not be completed (non-finite loss or rewards, the
    reward server gone for good): nothing of that iteration was saved and the
    newest checkpoint, named in the message, is intact for ``--resume``."""


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


# a checkpoint's version ends in its iteration, 7 digits (``Checkpoints._name``): no run goes further
MAX_ITERATION = 10**7 - 1
_STATE_MAX_BYTES = 256 << 20


def read_trainer_state(path: Path, iteration: int | None = None) -> TrainerState:
    """A checkpoint's ``state.json``, checked against :class:`TrainerState`'s schema: ``iteration`` an
    integer in 0..MAX_ITERATION (equal to ``iteration``, the one the checkpoint's name says, when given),
    ``history`` a list of {metric: number}, ``monitor`` a list of {key: number, text or null} with
    ``iteration`` and ``train_reward``, ``stopped`` text or null; a CheckpointError naming the file and
    the field otherwise."""
    def number(value: object) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    size = path.stat().st_size if path.is_file() else None
    if size is None:
        raise CheckpointError(f"{path}: missing (not a complete checkpoint)")
    if size > _STATE_MAX_BYTES:
        raise CheckpointError(f"{path}: {size} bytes, more than a checkpoint's state may hold ({_STATE_MAX_BYTES})")
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint state ({str(exc)[:200]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    fields = ("iteration", "history", "monitor", "stopped")
    for key in fields[:3]:
        if key not in data:
            raise CheckpointError(f"{path}: {key}: required key missing")
    unknown = sorted(str(k)[:80] for k in data if k not in fields)
    if unknown:
        raise CheckpointError(f"{path}: {unknown[0]}: unknown key (allowed: {', '.join(fields)})")
    value = data["iteration"]
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_ITERATION:
        raise CheckpointError(f"{path}: iteration: expected an integer in 0..{MAX_ITERATION}, got {str(value)[:80]}")
    if iteration is not None and value != iteration:
        raise CheckpointError(f"{path}: iteration: {value}, but the checkpoint is named for iteration {iteration}")
    history, monitor, stopped = data["history"], data["monitor"], data.get("stopped")
    if not isinstance(history, list):
        raise CheckpointError(f"{path}: history: expected a list, got {type(history).__name__}")
    for i, entry in enumerate(history):
        if not isinstance(entry, dict) or not all(number(v) for v in entry.values()):
            raise CheckpointError(f"{path}: history[{i}]: expected {{metric: number}}, got {str(entry)[:80]}")
    if not isinstance(monitor, list):
        raise CheckpointError(f"{path}: monitor: expected a list, got {type(monitor).__name__}")
    for i, entry in enumerate(monitor):
        ok = (isinstance(entry, dict) and isinstance(entry.get("iteration"), int) and "train_reward" in entry
              and all(v is None or number(v) or isinstance(v, str) for v in entry.values()))
        if not ok:
            raise CheckpointError(f"{path}: monitor[{i}]: expected {{iteration: int, train_reward: number or null, "
                                  f"score: number, ...}}, got {str(entry)[:80]}")
    if stopped is not None and not isinstance(stopped, str):
        raise CheckpointError(f"{path}: stopped: expected text or null, got {str(stopped)[:80]}")
    return TrainerState(iteration=value, history=history, monitor=monitor, stopped=stopped)


def _named_iteration(uri: str) -> int | None:
    """The iteration a checkpoint's URI names (``<run version>-<7 digits>``), or None."""
    match = re.search(r"-(\d{7})$", uri.rstrip("/"))
    return int(match.group(1)) if match else None


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's safetensors file, or a CheckpointError naming it."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (not a complete checkpoint)")
    try:
        return load_file(path)
    except Exception as exc:  # safetensors raises its own error types for a corrupt or planted file
        raise CheckpointError(f"{path}: unreadable safetensors file ({str(exc)[:200]})") from None


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
        return self.save_payload(state, module.state_dict(), optimizer.state_dict(), ema, config_hash)

    def save_payload(
        self,
        state: TrainerState,
        weights: dict[str, torch.Tensor],
        optimizer_state: dict,
        ema: EMA | None,
        config_hash: str,
        extra: dict | None = None,
    ) -> str:
        """Commit full weights and a torch AdamW state dict (what every engine reads and writes);
        ``extra`` (tensors and plain containers) goes into ``trainer.pt`` beside the optimizer."""
        with tempfile.TemporaryDirectory(prefix="flowrl-ckpt-") as tmp:
            tmp = Path(tmp)
            save_file({k: v.detach().contiguous() for k, v in weights.items()}, tmp / _WEIGHTS)
            if ema is not None:
                save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, tmp / _EMA)
            trainer = {"optimizer": optimizer_state, "torch_rng": torch.get_rng_state()}
            if extra is not None:
                trainer["extra"] = extra
            torch.save(trainer, tmp / _TRAINER)
            (tmp / _STATE).write_text(json.dumps(state.__dict__, sort_keys=True))
            return self.store.commit(
                tmp, stage=self.stage, version=self._name(state.iteration), config_hash=config_hash,
                inputs={"run": self.version},
            )

    def save_sharded(self, state: TrainerState, engine: ZeroEngine, ema: ShardedEMA | None,
                     config_hash: str) -> str:
        """Commit a ZeRO engine's checkpoint, each rank writing only its own shard (collective).

        Rank 0 makes a staging directory and names it to the others; every rank writes
        ``rank-<r>-of-<n>.safetensors`` there (:meth:`ZeroEngine.write_shard`); once all have
        written (or one failed: then nothing is committed and every rank raises), rank 0 adds
        ``sharded.json``, ``trainer.pt`` (its RNG state, AdamW's hyperparameters) and ``state.json``
        and commits the directory through the store, manifest last. Returns the URI on every rank."""
        rank, world = dist_info()
        staging = None
        if rank == 0:
            root = os.environ.get(STAGING_ENV) or None
            if root:
                Path(root).mkdir(parents=True, exist_ok=True)
            staging = tempfile.mkdtemp(prefix="flowrl-ckpt-", dir=root)
        staging = Path(broadcast(staging))
        try:
            outcome = self._write_shard(staging, engine, ema, rank, world)
            outcomes = [None] * world
            if world > 1:
                dist.all_gather_object(outcomes, outcome)
            else:
                outcomes = [outcome]
            failed = [f"rank {r}: {text}" for r, (ok, text) in enumerate(outcomes) if not ok]
            result = None
            if rank == 0:
                if failed:
                    result = (False, "; ".join(failed))
                else:
                    try:
                        result = (True, self._commit_sharded(staging, state, engine, ema, config_hash))
                    except Exception as exc:  # every rank must hear of it, or the others would wait forever
                        result = (False, f"rank 0: {type(exc).__name__}: {exc}")
            ok, text = broadcast(result)
        finally:
            barrier()  # every rank is done with the staging directory
            if rank == 0:
                shutil.rmtree(staging, ignore_errors=True)
        if not ok:
            raise ArtifactError(f"{self.stage}/{self._name(state.iteration)}: checkpoint not written (nothing was "
                                f"committed): {text}")
        return text

    @staticmethod
    def _write_shard(staging: Path, engine: ZeroEngine, ema: ShardedEMA | None, rank: int,
                     world: int) -> tuple[bool, str]:
        if not staging.is_dir():
            return False, (f"cannot see rank 0's staging directory {staging}: ranks on several nodes need a "
                           f"directory they share, named by {STAGING_ENV}")
        try:
            size = engine.write_shard(staging / shard_name(rank, world), ema)
        except Exception as exc:
            log.exception("rank %d: writing its checkpoint shard failed", rank)
            return False, f"{type(exc).__name__}: {exc}"
        return True, str(size)

    def _commit_sharded(self, staging: Path, state: TrainerState, engine: ZeroEngine, ema: ShardedEMA | None,
                        config_hash: str) -> str:
        _, world = dist_info()
        missing = [shard_name(r, world) for r in range(world) if not (staging / shard_name(r, world)).is_file()]
        if missing:
            raise ShardError(f"{staging}: {', '.join(missing)} missing although every rank reported it written")
        layout = {"format": SHARD_FORMAT, **engine.layout(), "ema": ema is not None}
        (staging / SHARDED).write_text(json.dumps(layout, indent=1))
        torch.save({"param_groups": engine.param_groups(), "torch_rng": torch.get_rng_state()}, staging / _TRAINER)
        (staging / _STATE).write_text(json.dumps(state.__dict__, sort_keys=True))
        return self.store.commit(staging, stage=self.stage, version=self._name(state.iteration),
                                 config_hash=config_hash, inputs={"run": self.version})

    def complete(self) -> list[tuple[int, str]]:
        """[(iteration, URI)] of this run's complete checkpoints, oldest first."""
        root = f"{self.store._root_path.rstrip('/')}/{self.stage}"
        if not self.store.fs.exists(root):
            return []
        pattern = re.compile(re.escape(self.version) + r"-(\d{7})$")
        found = []
        for path in self.store.fs.ls(root, detail=False):
            match = pattern.match(path.rstrip("/").rsplit("/", 1)[-1])
            if match and self.store.exists(self.stage, match.group(0)):
                found.append((int(match.group(1)), self.store.uri(self.stage, match.group(0))))
        return sorted(found)

    def latest(self) -> str | None:
        """URI of the newest complete checkpoint of this run, or None."""
        found = self.complete()
        return found[-1][1] if found else None

    def load(
        self, uri: str, module: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: EMA | None
    ) -> TrainerState:
        return self.load_into(uri, TorchEngine.of(module, optimizer), ema)

    def load_into(self, uri: str, engine: TorchEngine, ema: EMA | ShardedEMA | None,
                  extra: Callable[[dict], None] | None = None) -> TrainerState:
        """Restore a checkpoint into ``engine`` (collective under ZeRO: every rank calls it).
        ``extra``, when given, receives the checkpoint's extra state (:meth:`save_payload`), which
        it must then hold (full format only).

        A sharded checkpoint loads into the ZeRO engine layout that wrote it (each rank reads its
        own shard), or into one plain process (assembled in memory, as ``flowrl consolidate``
        would); anything else is an error pointing at ``flowrl consolidate``. A full-format
        checkpoint loads into any engine."""
        local = fetch(uri, fs=self.store.fs) if "://" in uri else fetch(uri)
        if (local / SHARDED).is_file():
            if extra is not None:
                raise CheckpointError(f"{uri}: a sharded checkpoint holds no extra trainer state")
            return self._load_sharded(uri, local, engine, ema)
        state = read_trainer_state(local / _STATE, _named_iteration(uri))  # the small files first
        trainer = read_trainer_file(local / _TRAINER, ("optimizer",) + (("extra",) if extra is not None else ()))
        engine.load_full_state_dict(_load_weights(local / _WEIGHTS))
        if ema is not None:
            if not (local / _EMA).is_file():
                raise ArtifactError(f"{uri}: the run uses EMA but the checkpoint has no {_EMA}")
            if isinstance(ema, ShardedEMA):
                ema.load_full(_load_weights(local / _EMA))
            else:
                ema.load_state_dict(_load_weights(local / _EMA))
        engine.load_optimizer_state(trainer["optimizer"])
        torch.set_rng_state(trainer["torch_rng"])
        if extra is not None:
            extra(trainer["extra"])
        return state

    def _load_sharded(self, uri: str, local: Path, engine: TorchEngine, ema) -> TrainerState:
        layout = read_layout(local)
        state = read_trainer_state(local / _STATE, _named_iteration(uri))
        trainer = read_trainer_file(local / _TRAINER, ("param_groups",))
        if isinstance(engine, ZeroEngine):
            engine.load_shard(local, layout, ema, uri)
        elif engine.world == 1:
            log.warning("%s: assembling a sharded checkpoint of %d ranks in memory for one plain process",
                        uri, layout["world"])
            full = consolidate(local)
            engine.load_full_state_dict(full.weights)
            engine.load_optimizer_state(full.optimizer)
            if ema is not None:
                if full.ema is None:
                    raise ArtifactError(f"{uri}: the run uses EMA but the checkpoint holds no EMA partitions")
                ema.load_state_dict(full.ema)
        else:
            raise ShardError(
                f"{uri}: a sharded checkpoint of {layout['world']} ZeRO-{layout['zero_stage']} ranks does not load "
                f"into {engine.world} plain processes: run `flowrl consolidate {uri} --output ROOT` and resume from "
                "the full-format checkpoint it commits under ROOT")
        torch.set_rng_state(trainer["torch_rng"])
        return state


def checkpoint_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """The trained module's weights in a local checkpoint directory of either format (a sharded
    one is assembled in memory, on the CPU)."""
    directory = Path(directory)
    if (directory / SHARDED).is_file():
        return consolidate(directory).weights
    return load_file(directory / _WEIGHTS)


def consolidate_checkpoint(uri: str, output_root: str, storage_options: dict | None = None) -> str:
    """``flowrl consolidate``: the sharded checkpoint at ``uri`` in the full format (the weights in
    the training dtype, a torch AdamW state dict, the EMA's weights with the averages in fp32, the
    run's state), committed under ``output_root`` with the same stage and version, where a run
    resumes from it on any engine and any number of ranks. One process, on the CPU; it holds the
    whole full-format checkpoint in host memory (what the old per-rank gathering held on every rank)."""
    local = fetch(uri)
    if not (local / SHARDED).is_file():
        raise ShardError(f"{uri}: not a sharded checkpoint (no {SHARDED}); it is in the full format already")
    manifest = read_manifest(uri)
    store = ArtifactStore(output_root, storage_options)
    target = store.uri(manifest.stage, manifest.version)
    if target.rstrip("/") == (uri if "://" in uri else str(Path(uri).resolve())).rstrip("/"):
        raise ShardError(f"{uri}: --output names the store that holds it; the consolidated checkpoint keeps the "
                         "same stage and version, so it needs another artifact root")
    read_trainer_state(local / _STATE, _named_iteration(uri))
    trainer = read_trainer_file(local / _TRAINER, ("param_groups",))
    full = consolidate(local)
    with tempfile.TemporaryDirectory(prefix="flowrl-consolidate-") as tmp:
        tmp = Path(tmp)
        save_file({k: v.contiguous() for k, v in full.weights.items()}, tmp / _WEIGHTS)
        if full.ema is not None:
            save_file({k: v.contiguous() for k, v in full.ema.items()}, tmp / _EMA)
        torch.save({"optimizer": full.optimizer, "torch_rng": trainer["torch_rng"]}, tmp / _TRAINER)
        shutil.copyfile(local / _STATE, tmp / _STATE)
        return store.commit(tmp, stage=manifest.stage, version=manifest.version, config_hash=manifest.config_hash,
                            inputs={**manifest.inputs, "sharded": uri}, code=manifest.code_version)


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


MONITOR_WINDOW = 10  # iterations of the tracked training score the hacking monitor averages
WATCHED = ("heldout", "fidelity")  # monitor scores the hacking check watches


@dataclass(frozen=True)
class LoopSettings:
    """What the shared loop needs from a stage's config."""

    iterations: int
    eval_every: int
    checkpoint_every: int
    hacking_threshold: float | None = None  # None: no hacking check
    stop_on_hacking: bool = False
    name: str = "train"  # progress bar label
    tracked: str = "train/reward"  # training score logged beside the monitor (and checked for hacking)
    # stop once the iterations' own seconds (monitor evaluations and checkpoints not counted) reach this;
    # None: no limit. Wall-clock, so a run it stops is not replayable by a resume: an operational setting
    time_budget_s: float | None = None


@dataclass(frozen=True)
class TrainResult:
    state: TrainerState
    # the weights to deploy (EMA when on); under ZeRO on rank 0 alone, in host memory ({} elsewhere)
    module_state: dict[str, torch.Tensor]


class LoopTrainer(abc.ABC):
    """The iteration loop of every RL-stage trainer.

    A subclass implements :meth:`step` (one iteration: collect, update,
    return metrics) and may extend :meth:`postfix`; the loop owns the rest:
    resume from the newest checkpoint, progress bar, tracker metrics every
    iteration, the held-out ``monitor(model, iteration)`` every
    ``eval_every`` iterations (evaluated on the EMA weights when EMA is on),
    the hacking check on the watched monitor scores, checkpoints every
    ``checkpoint_every`` iterations and at the end, and an early stop.
    Under torch.distributed every rank runs the loop; rank 0 alone logs and
    evaluates (its verdict is broadcast), except under ZeRO-3, where every
    rank samples the monitor's batch through the partitioned module and
    rank 0's scores are kept. Rank 0 writes full-format checkpoints; under
    ZeRO every rank writes its own shard.
    """

    def __init__(
        self,
        model,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer | TorchEngine,
        ema: EMA | None,
        settings: LoopSettings,
        monitor: Callable | None = None,
        checkpoints: Checkpoints | None = None,
        config_hash: str = "",
    ):
        self.rank, self.world = dist_info()
        # the engine steps the weights (plain / DDP, or DeepSpeed ZeRO); a bare optimizer gets a plain one
        self.engine = optimizer if isinstance(optimizer, TorchEngine) else TorchEngine.of(module, optimizer)
        if ema is not None and self.engine.sharded != isinstance(ema, ShardedEMA):
            raise TypeError(f"{type(ema).__name__} with a {type(self.engine).__name__}: build the EMA with the "
                            "engine's make_ema (under ZeRO it is sharded like the optimizer state)")
        self.model, self.module, self.optimizer, self.ema = model, module, self.engine.optimizer, ema
        self.loop, self.monitor, self.checkpoints, self.config_hash = settings, monitor, checkpoints, config_hash
        self.state = TrainerState()
        # watched held-out scores: the task's judge metric and, where the monitor gives it, fidelity
        # (texture drift that learned rewards miss shows there first)
        threshold = settings.hacking_threshold
        self.hacking = {key: HackingMonitor(threshold) for key in WATCHED} if threshold is not None else {}

    # ------------------------------------------------------------------ subclass API
    # failures of a step that end the run with a TrainingStopped naming the last good checkpoint
    # (a subclass adds e.g. the reward client's errors); anything else propagates as it is
    fatal_errors: tuple[type[BaseException], ...] = ()

    @abc.abstractmethod
    def step(self, iteration: int) -> dict[str, float]:
        """One iteration; returns its metrics (the same on every rank)."""

    def postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"s/it": f"{metrics['time/iteration_s']:.2f}"}

    def extra_state(self) -> dict | None:
        """What else a resumed run must restore to replay the uninterrupted one (e.g. random
        streams that run across iterations), tensors and plain containers; saved in each
        checkpoint's ``trainer.pt``. None: nothing. Plain engine only."""
        return None

    def load_extra_state(self, extra: dict) -> None:
        """Restore what :meth:`extra_state` returned when the checkpoint was written."""

    # ------------------------------------------------------------------ resume
    def resume(self) -> bool:
        """Load the newest complete checkpoint of this run, if there is one. Rank 0 logs what it
        resumed from (stage, version, iteration, checkpoint) or, as a warning, that it found none
        and the run starts fresh."""
        if self.checkpoints is None:
            if self.rank == 0:
                log.warning("%s: --resume: this run keeps no checkpoints; starting fresh from iteration 0",
                            self.loop.name)
            return False
        stage = self.checkpoints.stage.removesuffix(".checkpoints")
        uri = self.checkpoints.latest()
        if uri is None:
            if self.rank == 0:
                log.warning("%s: --resume: no checkpoint of version %s in %s; starting fresh from iteration 0",
                            stage, self.checkpoints.version, self.checkpoints.store.root)
            return False
        self.state = self.checkpoints.load_into(
            uri, self.engine, self.ema, self.load_extra_state if self.extra_state() is not None else None)
        for entry in self.state.monitor:  # rebuild the monitor's memory
            for key, watch in self.hacking.items():
                if key in entry:
                    watch.check(entry[key], entry["train_reward"])
        if self.rank == 0:
            log.info("%s: --resume: resumed version %s at iteration %d of %d from the checkpoint %s",
                     stage, self.checkpoints.version, self.state.iteration, self.loop.iterations, uri)
        return True

    # ------------------------------------------------------------------ the loop
    def _evaluate(self, iteration: int, model) -> dict[str, float]:
        """The monitor's scores (plain engine: on this rank alone, the EMA's weights swapped in)."""
        if self.ema is None:
            return self.monitor(model, iteration)
        with self.ema.swapped(self.module):
            return self.monitor(model, iteration)

    def _monitor_scores(self, iteration: int) -> dict[str, float]:
        """Rank 0's monitor scores, on every rank. Plain engine: rank 0 evaluates alone. ZeRO: every
        rank takes part in putting the EMA's weights into the module (and back); under ZeRO-3 every
        rank then samples the same batch through the partitioned module (each forward gathers the
        layer weights it needs), and rank 0's scores are kept."""
        if not self.engine.sharded:
            return broadcast(self._evaluate(iteration, self.model) if self.rank == 0 else None)
        with self.engine.holding(self.ema):
            every_rank = self.engine.partitioned
            return broadcast(self.monitor(self.model, iteration) if every_rank or self.rank == 0 else None)

    def _checkpoint(self) -> None:
        if self.checkpoints is not None:
            if self.engine.sharded:  # every rank writes its own shard; rank 0 commits
                if self.extra_state() is not None:
                    raise TypeError(f"{type(self).__name__}: extra trainer state is kept by the plain engine only")
                self.checkpoints.save_sharded(self.state, self.engine, self.ema, self.config_hash)
            elif self.rank == 0:
                self.checkpoints.save_payload(self.state, self.engine.full_state_dict(),
                                              self.engine.optimizer_state(), self.ema, self.config_hash,
                                              self.extra_state())
        barrier()

    def final_weights(self) -> dict[str, torch.Tensor]:
        """The weights to deploy (the EMA's when on), as a state dict of the trained module. Plain
        engine: on every rank, on the module's device. ZeRO: on rank 0 alone ({} elsewhere), in host
        memory, gathered one tensor at a time (collective)."""
        if self.engine.sharded:
            weights: dict[str, torch.Tensor] = {}
            self.engine.export(self.ema, lambda name, tensor: weights.__setitem__(name, tensor.to("cpu", copy=True)))
            return weights
        weights = self.ema.weights(self.module) if self.ema is not None else self.engine.full_state_dict()
        return {k: v.detach().clone() for k, v in weights.items()}

    def export_weights(self, path: str | Path) -> None:
        """Write :meth:`final_weights` to one safetensors file at ``path`` on rank 0, streamed one
        tensor at a time (collective under ZeRO): no rank holds a second copy of the model."""
        if self.engine.sharded:
            writer = SafetensorsWriter(path, self.engine.export_specs()) if self.rank == 0 else None
            self.engine.export(self.ema, writer.add if writer is not None else None)
            if writer is not None:
                writer.close()
            return
        if self.rank == 0:
            weights = self.ema.weights(self.module) if self.ema is not None else self.module.state_dict()
            with SafetensorsWriter(path, [(k, v.dtype, tuple(v.shape)) for k, v in weights.items()]) as writer:
                for name, tensor in weights.items():
                    writer.add(name, tensor)

    def _stopped(self, iteration: int, cause: str) -> TrainingStopped:
        last = self.checkpoints.latest() if self.checkpoints is not None else None
        where = (f"the last good checkpoint, left intact, is {last} (--resume continues from it)" if last
                 else "no checkpoint was written before it (a rerun starts from the beginning)")
        return TrainingStopped(f"{self.loop.name}: stopped at iteration {iteration + 1} of {self.loop.iterations}: "
                               f"{cause}; nothing of this iteration was saved; {where}")

    def train_seconds(self) -> float:
        """Seconds spent in the iterations so far (their ``time/iteration_s``; monitor evaluations and
        checkpoints are not counted): the clock ``time_budget_s`` reads."""
        return float(sum(h.get("time/iteration_s", 0.0) for h in self.state.history))

    def _over_budget(self, iteration: int) -> bool:
        """Whether the time budget ends the run after ``iteration``, decided by rank 0 for every rank (each
        rank's clock differs a little: they must all stop after the same iteration). Sets ``state.stopped``."""
        budget = self.loop.time_budget_s
        if budget is None or self.state.stopped or iteration + 1 >= self.loop.iterations:
            return False
        spent = broadcast(self.train_seconds() if self.rank == 0 else None)
        if spent < budget:
            return False
        self.state.stopped = (f"time budget: {spent:.0f} s of training reached {self.loop.name}'s time_budget_s = "
                              f"{budget:g} after {iteration + 1} iterations")
        return True

    def _monitor_step(self, iteration: int, log_metrics=None) -> dict:
        scores = self._monitor_scores(iteration)  # one judge, same verdict everywhere
        recent = [h[self.loop.tracked] for h in self.state.history[-MONITOR_WINDOW:] if self.loop.tracked in h]
        tracked = float(np.mean(recent)) if recent else None
        entry = {"iteration": iteration, "train_reward": tracked, **scores}
        self.state.monitor.append(entry)
        if log_metrics is not None and self.rank == 0:
            log_metrics({f"monitor/{k}": v for k, v in scores.items()}, iteration)
        found = [(key, watch.check(scores[key], tracked)) for key, watch in self.hacking.items() if key in scores]
        warning = "; ".join(f"{key}: {text}" for key, text in found if text)
        if warning:
            entry["hacking"] = warning
            log.warning("iteration %d: %s", iteration, warning)
            if self.loop.stop_on_hacking:
                self.state.stopped = warning
        return entry

    def train(
        self,
        log_metrics: Callable[[dict[str, float], int], None] | None = None,
        progress: bool = True,
        stop_after: int | None = None,
    ) -> TrainResult:
        """Run (or finish) the configured iterations. ``stop_after`` ends the
        call after that many iterations in total, as a kill would (tests).
        The engine is closed at the end, however the run ends (a process group
        it made for itself, ZeRO in one process, goes with it)."""
        try:
            return self._train(log_metrics, progress, stop_after)
        finally:
            self.engine.close()

    def _train(self, log_metrics, progress: bool, stop_after: int | None) -> TrainResult:
        loop = self.loop
        if self.monitor is not None and self.state.iteration == 0 and not self.state.monitor:
            self._monitor_step(0)
        bar = tqdm(range(self.state.iteration, loop.iterations), desc=loop.name,
                   disable=not progress or self.rank != 0, initial=self.state.iteration, total=loop.iterations,
                   mininterval=2.0)
        for iteration in bar:
            # a run that stopped early (hacking, time budget) and was resumed from that checkpoint is done
            if self.state.stopped or (stop_after is not None and iteration >= stop_after):
                break
            start = time.perf_counter()
            try:
                metrics = self.step(iteration)
            except self.fatal_errors as exc:
                raise self._stopped(iteration, str(exc)) from exc
            bad = sorted(key for key, value in metrics.items() if not math.isfinite(value))
            if bad:  # the update already happened in memory: it is never checkpointed
                raise self._stopped(iteration, "non-finite " + ", ".join(f"{k}={metrics[k]}" for k in bad))
            metrics["time/iteration_s"] = time.perf_counter() - start
            self.state.history.append(metrics)
            self.state.iteration = iteration + 1
            if log_metrics is not None and self.rank == 0:
                log_metrics(metrics, iteration + 1)
            postfix = self.postfix(metrics)
            if self.monitor is not None and (iteration + 1) % loop.eval_every == 0:
                entry = self._monitor_step(iteration + 1, log_metrics)
                postfix["judge"] = f"{entry['heldout']:.3f}"
            bar.set_postfix(postfix, refresh=False)  # drawn with the bar's next update (every 2 s at most)
            if self._over_budget(iteration):
                log.info("%s", self.state.stopped)
                if self.monitor is not None and (iteration + 1) % loop.eval_every:
                    self._monitor_step(iteration + 1, log_metrics)  # the curve ends where training did
            if (iteration + 1) % loop.checkpoint_every == 0 or iteration + 1 == loop.iterations:
                self._checkpoint()
            if self.state.stopped:
                self._checkpoint()
                break
        weights = self.final_weights()
        if self.engine.sharded:
            self.engine.settle(self.ema)
        return TrainResult(self.state, weights)
