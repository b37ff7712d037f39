"""How an RL trainer steps its weights: plain PyTorch (one process, or
DistributedDataParallel under torchrun / Flyte Elastic) or DeepSpeed ZeRO
(stage 1, 2 or 3; the production path for full-parameter training of large
models).

Both engines give the trainers one interface (:meth:`view`, :meth:`accumulate`,
:meth:`backward`, :meth:`step`) and one checkpoint format: the full fp32
weights and a ``torch.optim.AdamW`` state dict with the parameters numbered in
``module.parameters()`` order. A ZeRO engine assembles both from the ranks'
partitions (collective calls), so a checkpoint does not depend on the number
of ranks or on the engine that wrote it: one written by ZeRO-3 ranks loads into
one plain process (tested), and any loads into a ZeRO engine.

The optimizer is AdamW either way; under ZeRO it is the same torch class
stepping each rank's flat partition, so one step is the same update as the
plain engine's (gradient clipping included: DeepSpeed's ``gradient_clipping``
is the same global-norm clip).
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import logging
import os
from typing import Iterator

import torch
import torch.distributed as dist

from flowrl.models.base import FlowModel
from flowrl.rl.distributed import dist_info

log = logging.getLogger(__name__)

TRAINABLE_ATTRS = ("net", "transformer")  # where each family keeps the network it trains


def trainable_attr(model: FlowModel, module: torch.nn.Module) -> str:
    """The attribute of ``model`` that holds ``module`` (the shapes DiT's
    ``net``, Qwen-Image's ``transformer``)."""
    for name in TRAINABLE_ATTRS:
        if getattr(model, name, None) is module:
            return name
    raise TypeError(f"{type(model).__name__}: the trained module is none of its {' / '.join(TRAINABLE_ATTRS)}")


def _wrapped_view(model: FlowModel, attr: str, wrapper: torch.nn.Module) -> FlowModel:
    view = copy.copy(model)
    setattr(view, attr, wrapper)
    return view


class TorchEngine:
    """AdamW on the module; under torch.distributed its forward runs through
    one DistributedDataParallel wrapper, which averages gradients in backward."""

    zero_stage = 0
    partitioned = False  # the module's parameters are whole on every rank

    def __init__(self, module: torch.nn.Module, *, lr: float, weight_decay: float, grad_clip: float,
                 optimizer: torch.optim.Optimizer | None = None):
        self.module, self.grad_clip = module, grad_clip
        self.optimizer = optimizer or torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
        self.rank, self.world = dist_info()
        self._ddp = None
        self._views: dict[int, FlowModel] = {}

    @classmethod
    def of(cls, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
           grad_clip: float = float("inf")) -> "TorchEngine":
        """An engine around an optimizer built elsewhere."""
        return cls(module, lr=0.0, weight_decay=0.0, grad_clip=grad_clip, optimizer=optimizer)

    # ------------------------------------------------------------------ forward / backward / step
    def view(self, model: FlowModel) -> FlowModel:
        """``model`` with its trained network behind the engine's gradient
        reduction (``model`` itself in one process). One wrapper serves every
        model that shares the module (Qwen-Image's T2I and edit views): two
        DDP wrappers over the same weights would reduce every gradient twice."""
        if self.world == 1:
            return model
        if self._ddp is None:
            from torch.nn.parallel import DistributedDataParallel

            # T2I batches never touch the source-image branch: without find_unused_parameters the
            # buckets holding those weights would never be reduced, and neither would their neighbours
            self._ddp = DistributedDataParallel(self.module, find_unused_parameters=True)
        if id(model) not in self._views:
            self._views[id(model)] = _wrapped_view(model, trainable_attr(model, self.module), self._ddp)
        return self._views[id(model)]

    @contextlib.contextmanager
    def accumulate(self, view: FlowModel, last: bool) -> Iterator[None]:
        """Forward and backward of one part of a step's gradient; only the
        ``last`` part reduces across ranks (the others accumulate locally)."""
        if last or self._ddp is None:
            yield
        else:
            with self._ddp.no_sync():
                yield

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> float:
        """Clip the gradient's global norm, take the AdamW step; returns the norm before clipping."""
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.optimizer.step()
        return float(norm)

    # ------------------------------------------------------------------ checkpoint format
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The module's full weights (collective under ZeRO; every rank gets them)."""
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def load_full_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(weights, strict=True)

    def optimizer_state(self) -> dict:
        """AdamW's state dict, parameters numbered in ``module.parameters()`` order."""
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict) -> None:
        # torch keeps tensors it need not cast: a copy, so the caller's dict never aliases the live state
        self.optimizer.load_state_dict(copy.deepcopy(state))

    @contextlib.contextmanager
    def evaluation_model(self, model: FlowModel) -> Iterator[FlowModel]:
        """A model rank 0 can sample from on its own (collective to enter)."""
        yield model

    def close(self) -> None:
        """Release what the engine set up for itself (nothing here)."""

    def plain_model(self, model: FlowModel) -> FlowModel:
        """A model whose weights are whole on this rank, to load the trained weights into."""
        return model


class ZeroEngine(TorchEngine):
    """DeepSpeed ZeRO over the module: optimizer states (stage 1), gradients
    (2) and parameters (3) partitioned across the data-parallel ranks.

    Stage 3 also partitions the weights the rest of the trainer reads: full
    weights are gathered for checkpoints and for the held-out monitor, which
    rank 0 runs on a plain copy of the model (``plain``, rank 0 only) kept
    for that and for the stage's final evaluation."""

    def __init__(self, module: torch.nn.Module, *, lr: float, weight_decay: float, grad_clip: float,
                 zero_stage: int, model: FlowModel):
        if zero_stage not in (1, 2, 3):
            raise ValueError(f"zero_stage must be 1, 2 or 3 for DeepSpeed, got {zero_stage}")
        try:
            import deepspeed
        except ImportError as exc:
            raise ImportError(
                "zero_stage > 0 trains with DeepSpeed, which is not installed: pip install --no-build-isolation "
                "-r requirements/gpu.txt (after torch)"
            ) from exc
        self.module, self.grad_clip, self.zero_stage = module, grad_clip, zero_stage
        self.partitioned = zero_stage == 3
        self._own_group = not dist.is_initialized()
        # one process: LOCAL_RANK as a launcher would set it (DeepSpeed reads it while it runs; close()
        # removes it, or processes started from this one would think a launcher ran them too)
        self._own_local_rank = self._own_group and "LOCAL_RANK" not in os.environ
        if self._own_local_rank:
            os.environ["LOCAL_RANK"] = "0"
        if self._own_group:  # and a group of one, so DeepSpeed runs unchanged
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", store=dist.HashStore(),
                                    rank=0, world_size=1)
        self.rank, self.world = dist_info()
        # ZeRO-3: rank 0's copy for the monitor and the final evaluation, taken before the weights are partitioned
        self.plain = copy.deepcopy(model) if self.partitioned and self.rank == 0 else None
        self._names = [name for name, _ in module.named_parameters()]
        optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
        config = {
            "train_micro_batch_size_per_gpu": 1,  # the trainers size their own batches
            "gradient_accumulation_steps": 1,
            "gradient_clipping": grad_clip,
            # stage 3 would otherwise swap torch.nn.functional.linear for its own, for the whole process
            "zero_optimization": {"stage": zero_stage, "memory_efficient_linear": False},
            "zero_allow_untested_optimizer": True,  # torch's AdamW: exact, if not DeepSpeed's fused one
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config,
                                                                 dist_init_required=False)
        self._attr = trainable_attr(model, module)
        self._views = {}

    def view(self, model: FlowModel) -> FlowModel:
        if id(model) not in self._views:
            self._views[id(model)] = _wrapped_view(model, trainable_attr(model, self.module), self.engine)
        return self._views[id(model)]

    @contextlib.contextmanager
    def accumulate(self, view: FlowModel, last: bool) -> Iterator[None]:
        # ZeRO reduces gradients into partitions as they come; the boundary tells it when a step's are complete
        self.engine.set_gradient_accumulation_boundary(last)
        yield

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the trainers weight their parts themselves

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def step(self) -> float:
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()
        return float(self.engine.get_global_grad_norm())

    # ------------------------------------------------------------------ checkpoint format
    def _gathered(self):
        if not self.partitioned:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=0)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        with self._gathered():
            return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def load_full_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        from deepspeed.utils import safe_set_full_fp32_param

        with self._gathered():  # ZeRO-3: rank 0's copy is partitioned out again on exit
            self.module.load_state_dict(weights, strict=True)
        for name, param in self.module.named_parameters():  # the fp32 master partitions the optimizer steps
            self._set_full(param, weights[name].to(torch.float32), None, safe_set_full_fp32_param)

    def _set_full(self, param, value: torch.Tensor, key: str | None, setter) -> None:
        """Write this rank's slice of a full fp32 tensor (the master weights, or an AdamW moment when
        ``key``) into its partition. ZeRO-3 pads the last partition of a parameter whose size the
        ranks do not divide, and DeepSpeed's own setter reads past the end there: the slice is cut here."""
        if not self.partitioned:
            setter(param, value) if key is None else setter(param, value, key)
            return
        if not param.requires_grad:
            return
        z3 = param._z3_optimizer
        part, _ = z3._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
        start = part.numel() * z3._get_param_partition_rank(param)
        flat = value.flatten()
        count = max(0, min(part.numel(), flat.numel() - start))
        part.data[:count].copy_(flat[start : start + count])

    def _base(self) -> torch.optim.Optimizer:
        return self.optimizer.optimizer  # the torch AdamW stepping this rank's flat partitions

    def optimizer_state(self) -> dict:
        from deepspeed.utils import safe_get_full_optimizer_state

        base = self._base()
        group = {k: v for k, v in base.param_groups[0].items() if k != "params"}
        group["params"] = list(range(len(self._names)))
        state = {}
        steps = [s["step"] for s in base.state.values() if "step" in s]
        if steps:  # AdamW has stepped: assemble each parameter's moments from the partitions
            step = steps[0].clone() if torch.is_tensor(steps[0]) else torch.tensor(float(steps[0]))
            for i, (_, param) in enumerate(self.module.named_parameters()):
                state[i] = {"step": step.clone(),
                            **{key: safe_get_full_optimizer_state(param, key).detach().clone().reshape(
                                param.ds_shape if self.partitioned else param.shape)
                               for key in ("exp_avg", "exp_avg_sq")}}
        return {"state": state, "param_groups": [group]}

    def load_optimizer_state(self, state: dict) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        if not state["state"]:
            return
        base = self._base()
        # plain AdamW counts steps per parameter and skips parameters without a gradient; ZeRO steps
        # flat partitions with one count: the largest saved count stands for all, and a parameter
        # the plain run never stepped starts from zero moments
        step = max(float(entry["step"]) for entry in state["state"].values())
        # what AdamW's first step would create, then the saved moments; ZeRO-3 keys the state by its flat
        # fp32 partitions (its param groups hold them only while it steps)
        flats = (list(self.optimizer.fp32_partitioned_groups_flat) if self.partitioned
                 else [flat for group in base.param_groups for flat in group["params"]])
        for flat in flats:
            base.state[flat] = {"step": torch.as_tensor(step, dtype=torch.float32).clone(),
                                "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
        link = getattr(self.optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:  # ZeRO-1/2 map each parameter onto its slice of the new state on first use
            link()
        for i, (_, param) in enumerate(self.module.named_parameters()):
            entry = state["state"].get(i)
            if entry is None:
                continue
            for key in ("exp_avg", "exp_avg_sq"):
                self._set_full(param, entry[key].to(torch.float32), key, safe_set_full_optimizer_state)

    @contextlib.contextmanager
    def evaluation_model(self, model: FlowModel) -> Iterator[FlowModel]:
        if not self.partitioned:
            yield model
            return
        weights = self.full_state_dict()  # every rank takes part in the gather; rank 0 alone evaluates
        if self.plain is None:
            yield model
            return
        getattr(self.plain, self._attr).load_state_dict(weights)
        yield self.plain


    def plain_model(self, model: FlowModel) -> FlowModel:
        return self.plain if self.plain is not None else model

    def close(self) -> None:
        if self._own_group and dist.is_initialized():
            from flowrl.rl.distributed import destroy

            destroy()
            self._own_group = False
        if self._own_local_rank:
            os.environ.pop("LOCAL_RANK", None)
            self._own_local_rank = False


def freeze_except(module: torch.nn.Module, patterns: tuple[str, ...], where: str = "grpo") -> int:
    """Train only the parameters whose names (``module.named_parameters()``)
    match one of the shell-style ``patterns`` (``blocks.*.qkv.*``); every other
    parameter gets ``requires_grad`` False, so it has no gradient, no AdamW
    state and no decay, and DDP leaves it out of its buckets. Empty
    ``patterns``: all are trained (nothing changes). Returns the number of
    trained elements. A pattern that matches nothing is an error naming it and
    some real names (a typo would otherwise train less than asked, silently)."""
    if not patterns:
        return sum(p.numel() for p in module.parameters() if p.requires_grad)
    names = [name for name, _ in module.named_parameters()]
    for pattern in patterns:
        if not fnmatch.filter(names, pattern):
            raise ValueError(
                f"{where}.trainable: {pattern!r} matches no parameter of {type(module).__name__} "
                f"(names look like {', '.join(names[:3])}, ...; {len(names)} in all)")
    trained = 0
    for name, param in module.named_parameters():
        keep = any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
        param.requires_grad_(keep)
        trained += param.numel() if keep else 0
    return trained


def make_engine(model: FlowModel, module: torch.nn.Module, *, lr: float, weight_decay: float, grad_clip: float,
                zero_stage: int = 0, ema: bool = False, where: str = "grpo",
                trainable: tuple[str, ...] = ()) -> TorchEngine:
    """The engine of ``where``'s config: plain / DDP at ``zero_stage`` 0, DeepSpeed ZeRO above.
    ``trainable``: name patterns of the parameters trained (:func:`freeze_except`; empty: all)."""
    if trainable and zero_stage > 0:
        raise ValueError(f"{where}.trainable with {where}.zero_stage = {zero_stage}: the ZeRO checkpoint format "
                         "assembles AdamW moments for every parameter; train a subset with zero_stage 0")
    trained = freeze_except(module, trainable, where)
    if trainable:
        total = sum(p.numel() for p in module.parameters())
        log.info("%s.trainable: training %d of %d parameters (%.1f %%), matching %s", where, trained, total,
                 100.0 * trained / total, ", ".join(trainable))
    if zero_stage == 0:
        return TorchEngine(module, lr=lr, weight_decay=weight_decay, grad_clip=grad_clip)
    if ema and zero_stage == 3:
        raise ValueError(f"{where}.ema_decay > 0 with {where}.zero_stage = 3: ZeRO-3 partitions the weights the "
                         "EMA averages; use zero_stage 1 or 2 with EMA")
    return ZeroEngine(module, lr=lr, weight_decay=weight_decay, grad_clip=grad_clip, zero_stage=zero_stage,
                      model=model)
