"""How an RL trainer steps its weights: plain PyTorch (one process, or
DistributedDataParallel under torchrun / Flyte Elastic) or DeepSpeed ZeRO
(stage 1, 2 or 3; the production path for full-parameter training of large
models).

Both engines give the trainers one interface (:meth:`view`, :meth:`accumulate`,
:meth:`backward`, :meth:`step`). Checkpoints differ (docs/checkpoints.md): the
plain engine's are the full weights and a ``torch.optim.AdamW`` state dict
with the parameters numbered in ``module.parameters()`` order, written by rank
0; a ZeRO engine's are sharded, each rank writing only what it owns (its
slices of the fp32 masters, of AdamW's moments and of the EMA), and resume on
the same number of ranks. ``flowrl consolidate`` turns a sharded checkpoint
into the full format offline; the full format loads into either engine.

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
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from flowrl.models.base import FlowModel
from flowrl.rl.ema import EMA
from flowrl.rl.distributed import dist_info
from flowrl.rl.shards import (Fragment, FrozenPiece, SafetensorsWriter, ShardError, dtype_name, read_into,
                              read_shard_metadata, shard_metadata, shard_name)

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
    sharded = False  # checkpoints in the full format, written by rank 0 alone

    def __init__(self, module: torch.nn.Module, *, lr: float, weight_decay: float, grad_clip: float,
                 optimizer: torch.optim.Optimizer | None = None):
        self.module, self.grad_clip = module, grad_clip
        self.optimizer = optimizer or torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay,
                                                        foreach=True)
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
        # multi-tensor norm and scaling (foreach): the same values as the per-tensor loop, fewer kernel launches
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip, foreach=True)
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

    def make_ema(self, decay: float) -> EMA:
        """The EMA of the trained weights (:class:`flowrl.rl.ema.EMA`)."""
        return EMA(self.module, decay)

    def close(self) -> None:
        """Release what the engine set up for itself (nothing here)."""

    def plain_model(self, model: FlowModel) -> FlowModel:
        """A model whose weights are whole on this rank, to load the trained weights into."""
        return model


class ShardedEMA:
    """The EMA of a ZeRO engine: fp32, of the trained parameters only, and
    sharded like the optimizer state. Each rank averages its own partitions
    of the fp32 master weights (one flat tensor per partition group, the
    shape of the masters) after every step; the averaged weights are put
    into the module only to be evaluated or exported
    (:meth:`ZeroEngine.holding`), and each rank saves its partitions in its
    checkpoint shard."""

    def __init__(self, engine: "ZeroEngine", decay: float):
        self.engine, self.decay = engine, decay
        self.flats = [master.detach().clone() for master in engine.master_flats()]  # the base weights, in fp32

    @torch.no_grad()
    def update(self, module: torch.nn.Module | None = None) -> None:
        """Move the averages towards the masters the last step wrote (``module`` is not read: the
        masters are the trained weights in full precision)."""
        for average, master in zip(self.flats, self.engine.master_flats()):
            average.lerp_(master, 1.0 - self.decay)

    @torch.no_grad()
    def load_full(self, weights: dict[str, torch.Tensor]) -> None:
        """This rank's partitions from a full-format EMA state dict (name -> whole tensor)."""
        for fragment in self.engine.fragments():
            if fragment.name not in weights:
                raise ShardError(f"the EMA weights have no {fragment.name}")
            source = weights[fragment.name].reshape(-1)[fragment.param_start:fragment.param_start + fragment.numel]
            self.flats[fragment.group][fragment.flat_start:fragment.flat_start + fragment.numel].copy_(source)


class ZeroEngine(TorchEngine):
    """DeepSpeed ZeRO over the module: optimizer states (stage 1), gradients
    (2) and parameters (3) partitioned across the data-parallel ranks.

    Nothing holds the whole model in full precision: checkpoints are sharded
    (:meth:`write_shard`), the EMA is sharded like the optimizer state
    (:class:`ShardedEMA`), the held-out monitor runs through the module as
    it is (under stage 3 on every rank, each forward gathering one layer's
    weights at a time) and the final weights are gathered one tensor at a
    time on rank 0 (:meth:`export`)."""

    sharded = True

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
        # ZeRO-3: the module's structure without its weights (parameters on the meta device, buffers
        # copied), taken before they are partitioned: plain_model fills it with the final weights
        self._skeleton = _meta_copy(module) if self.partitioned else None
        self._device = next(module.parameters()).device
        self._names = [name for name, _ in module.named_parameters()]
        self._ema: ShardedEMA | None = None
        self._released = False
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

    def make_ema(self, decay: float) -> ShardedEMA:
        self._ema = ShardedEMA(self, decay)
        return self._ema

    # ------------------------------------------------------------------ this rank's partitions
    def _base(self) -> torch.optim.Optimizer:
        return self.optimizer.optimizer  # the torch AdamW stepping this rank's flat partitions

    def master_flats(self) -> list[torch.Tensor]:
        """This rank's flat fp32 master partitions, one per partition group (what AdamW steps)."""
        if self.partitioned:
            return list(self.optimizer.fp32_partitioned_groups_flat)
        return list(self.optimizer.single_partition_of_fp32_groups)

    def fragments(self) -> list[Fragment]:
        """Where each trained parameter's elements owned by this rank sit in the master partitions."""
        found = []
        if self.partitioned:
            z3 = self.optimizer
            for name, param in self.module.named_parameters():
                if not param.requires_grad:
                    continue
                group, offset, part = z3.grad_position[z3.get_param_id(param)]
                start = part * z3._get_param_partition_rank(param)
                count = max(0, min(part, param.ds_numel - start))  # the last partitions are padded
                if count:
                    found.append(Fragment(name, group, offset, start, count))
            return found
        for name, param in self.module.named_parameters():
            mapping = getattr(param, "_hp_mapping", None)
            if mapping is None or mapping.lp_fragment_address.numel == 0:
                continue
            lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
            found.append(Fragment(name, mapping.param_group_index, hp.start, lp.start, lp.numel))
        return found

    def _frozen(self) -> list[tuple[FrozenPiece, torch.Tensor]]:
        """Parameters the optimizer does not step, with this rank's part of each to save: under
        ZeRO-3 each rank's partition, under ZeRO-1/2 the whole tensor on rank 0."""
        found = []
        for name, param in self.module.named_parameters():
            if param.requires_grad:
                continue
            if self.partitioned:
                part = param.partition_numel()
                start = part * self.rank
                count = max(0, min(part, param.ds_numel - start))
                if count:
                    found.append((FrozenPiece(name, start, count), param.ds_tensor.reshape(-1)[:count]))
            elif self.rank == 0:
                found.append((FrozenPiece(name, 0, param.numel()), param.detach().reshape(-1)))
        return found

    def _buffers(self) -> dict[str, torch.Tensor]:
        """The module's saved buffers (whole on every rank under every stage)."""
        return {k: v for k, v in self.module.state_dict(keep_vars=True).items()
                if not isinstance(v, torch.nn.Parameter)}

    def _shape(self, param: torch.nn.Parameter) -> tuple[int, ...]:
        return tuple(param.ds_shape) if self.partitioned else tuple(param.shape)

    def layout(self) -> dict:
        """What ``sharded.json`` says of the module (the same on every rank)."""
        keys = list(self.module.state_dict(keep_vars=True))
        return {"zero_stage": self.zero_stage, "world": self.world,
                "params": [{"name": name, "shape": list(self._shape(p)), "dtype": dtype_name(p.dtype),
                            "trained": p.requires_grad} for name, p in self.module.named_parameters()],
                "state_keys": keys, "buffers": list(self._buffers())}

    def param_groups(self) -> list[dict]:
        """AdamW's hyperparameters (of its first group), for the full format's state dict."""
        return [{k: v for k, v in self._base().param_groups[0].items() if k != "params"}]

    # ------------------------------------------------------------------ sharded checkpoints
    def write_shard(self, path: Path, ema: ShardedEMA | None) -> int:
        """Write this rank's checkpoint shard to ``path``: its fp32 master partitions, AdamW's moments
        and step of each, the EMA's partitions, its part of any frozen parameter and (rank 0) the
        buffers; streamed, so nothing is copied whole. Returns the bytes written."""
        entries: list[tuple[str, torch.Tensor]] = []
        base = self._base()
        masters = self.master_flats()
        for g, master in enumerate(masters):
            entries.append((f"fp32.{g}", master))
            state = base.state.get(master) or {}
            if "exp_avg" in state:
                step = state["step"]
                step = step.detach().clone() if torch.is_tensor(step) else torch.tensor(float(step))
                entries += [(f"exp_avg.{g}", state["exp_avg"]), (f"exp_avg_sq.{g}", state["exp_avg_sq"]),
                            (f"step.{g}", step)]
            if ema is not None:
                entries.append((f"ema.{g}", ema.flats[g]))
        frozen = self._frozen()
        entries += [(f"frozen.{piece.name}", tensor) for piece, tensor in frozen]
        if self.rank == 0:
            entries += [(f"buffer.{name}", tensor.detach()) for name, tensor in self._buffers().items()]
        metadata = shard_metadata(self.rank, self.world, self.zero_stage, len(masters), self.fragments(),
                                  [piece for piece, _ in frozen])
        specs = [(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in entries]
        with SafetensorsWriter(path, specs, metadata) as writer:
            for name, tensor in entries:
                writer.add(name, tensor)
        return writer.bytes

    @torch.no_grad()
    def load_shard(self, directory: Path, layout: dict, ema: ShardedEMA | None, uri: str) -> None:
        """Load this rank's shard of the checkpoint in ``directory`` (``layout``: its ``sharded.json``;
        rank 0's file also holds the buffers and, under ZeRO-1/2, the frozen parameters), then derive
        the training-dtype weights from the masters as a step does. Only the layout that wrote it
        reads a sharded checkpoint: another is an error naming ``flowrl consolidate``."""
        from safetensors import safe_open

        hint = (f"resume on the layout that wrote it, or run `flowrl consolidate {uri} --output ROOT` and resume "
                "from the full-format checkpoint it commits under ROOT")
        if (layout["world"], layout["zero_stage"]) != (self.world, self.zero_stage):
            raise ShardError(f"{uri}: written by {layout['world']} ranks under ZeRO-{layout['zero_stage']}, this "
                             f"run has {self.world} under ZeRO-{self.zero_stage}; {hint}")
        path, first = directory / shard_name(self.rank, self.world), directory / shard_name(0, self.world)
        if not path.is_file():
            raise ShardError(f"{uri}: {path.name} is missing; {hint}")
        meta = read_shard_metadata(path)
        if meta["fragments"] != self.fragments():
            raise ShardError(f"{uri}: {path.name} partitions the parameters differently from this run; {hint}")
        masters = self.master_flats()
        params = dict(self.module.named_parameters())
        with safe_open(str(path), "pt") as handle:
            keys = set(handle.keys())
            for g, master in enumerate(masters):
                read_into(handle, f"fp32.{g}", master)
            if "exp_avg.0" in keys:
                self._fresh_optimizer_state(float(handle.get_tensor("step.0")))
                base = self._base()
                for g, master in enumerate(masters):
                    for key in ("exp_avg", "exp_avg_sq"):
                        read_into(handle, f"{key}.{g}", base.state[master][key])
                    base.state[master]["step"].copy_(handle.get_tensor(f"step.{g}"))
            if ema is not None:
                if "ema.0" not in keys:
                    raise ShardError(f"{uri}: the run uses EMA but {path.name} holds no EMA partitions")
                for g, flat in enumerate(ema.flats):
                    read_into(handle, f"ema.{g}", flat)
            for piece in meta["frozen"] if self.partitioned else []:  # this rank's partition of each
                params[piece.name].ds_tensor.reshape(-1)[:piece.numel].copy_(handle.get_tensor(f"frozen.{piece.name}"))
        with safe_open(str(first), "pt") as handle:
            for name, buffer in self._buffers().items():
                buffer.copy_(handle.get_tensor(f"buffer.{name}"))
            for piece in [] if self.partitioned else read_shard_metadata(first)["frozen"]:  # whole, from rank 0
                param = params[piece.name]
                param.data.copy_(handle.get_tensor(f"frozen.{piece.name}").reshape(param.shape))
        self._publish(masters)

    def _fresh_optimizer_state(self, step: float) -> None:
        """AdamW's state as its first step would create it (zero moments, ``step`` counted), keyed as
        DeepSpeed keys it: ZeRO-3 by its flat fp32 partitions (its param groups hold them only while it
        steps), ZeRO-1/2 by its param groups' flat partitions, each parameter linked to its slice."""
        base = self._base()
        flats = (list(self.optimizer.fp32_partitioned_groups_flat) if self.partitioned
                 else [flat for group in base.param_groups for flat in group["params"]])
        for flat in flats:
            base.state[flat] = {"step": torch.as_tensor(step, dtype=torch.float32).clone(),
                                "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
        link = getattr(self.optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:  # ZeRO-1/2 map each parameter onto its slice of the new state on first use
            link()

    # ------------------------------------------------------------------ the weights the module holds
    def _bit16_flats(self) -> list[torch.Tensor]:
        """This rank's partitions of the weights in the training dtype (what forwards read)."""
        if self.partitioned:
            return list(self.optimizer.fp16_partitioned_groups_flat)
        opt = self.optimizer
        return [parts[dist.get_rank(group=opt.real_dp_process_group[i])]
                for i, parts in enumerate(opt.parallel_partitioned_bit16_groups)]

    @torch.no_grad()
    def _publish(self, flats: list[torch.Tensor]) -> None:
        """Cast fp32 partitions (the masters, or the EMA's) into the training-dtype weights and make
        them whole where the stage keeps them whole, as DeepSpeed does after a step (collective):
        ZeRO-1/2 all-gather the module's weights; ZeRO-3 releases any gathered parameter and gathers
        its persistent (small, never released) ones again."""
        opt = self.optimizer
        if self.partitioned:
            opt._partition_all_parameters()
        for i, (target, flat) in enumerate(zip(self._bit16_flats(), flats)):
            target.data.copy_(flat.data)
            if self.partitioned:
                opt._unflatten_partitioned_parameters(i)
        if self.partitioned:
            if opt.persistent_parameters:
                opt.persistent_parameters[0].all_gather(opt.persistent_parameters)
            return
        from deepspeed.runtime.utils import all_gather_dp_groups

        all_gather_dp_groups(groups_flat=opt.bit16_groups_flat, partitioned_param_groups=opt.parallel_partitioned_bit16_groups,
                             dp_process_group=opt.real_dp_process_group, start_alignment_factor=opt.nccl_start_alignment_factor,
                             allgather_bucket_size=opt.allgather_bucket_size)

    @contextlib.contextmanager
    def holding(self, ema: ShardedEMA | None) -> Iterator[None]:
        """The module holds the EMA weights inside the block (the live ones without EMA), the live
        ones again after it; collective on entry and exit."""
        if ema is None:
            yield
            return
        masters = self.master_flats()
        # with torch autocast DeepSpeed's training-dtype partitions may be the masters themselves
        aliased = any(a.data_ptr() == b.data_ptr() for a, b in zip(self._bit16_flats(), masters))
        saved = [master.clone() for master in masters] if aliased else None
        self._publish(ema.flats)
        try:
            yield
        finally:
            if saved is not None:
                for master, copy_ in zip(masters, saved):
                    master.copy_(copy_)
            self._publish(masters)

    def export(self, ema: ShardedEMA | None, sink) -> None:
        """Every entry of the module's state dict (the EMA's weights when ``ema``), one at a time:
        rank 0 calls ``sink(name, tensor)`` (the tensor is only valid during the call); ZeRO-3 gathers
        one parameter at a time on every rank, so no rank ever holds more than one whole. Collective."""
        import deepspeed

        with self.holding(ema):
            for name, value in self.module.state_dict(keep_vars=True).items():
                if self.partitioned and hasattr(value, "ds_id"):
                    with deepspeed.zero.GatheredParameters([value]):
                        if self.rank == 0:
                            sink(name, value.detach())
                elif self.rank == 0:
                    sink(name, value.detach())

    def export_specs(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(name, dtype, shape) of what :meth:`export` hands over, in its order."""
        return [(name, value.dtype, self._shape(value) if isinstance(value, torch.nn.Parameter) else tuple(value.shape))
                for name, value in self.module.state_dict(keep_vars=True).items()]

    # ------------------------------------------------------------------ the full format (collective)
    def _gathered(self):
        if not self.partitioned:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=0)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole module on every rank (every parameter gathered at once under ZeRO-3): for small
        models and tests; checkpoints and exports never call it."""
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

    def optimizer_state(self) -> dict:
        """AdamW's state in the full format, each parameter's moments assembled on every rank (the
        memory of the whole optimizer state per rank): for small models and tests."""
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
        # plain AdamW counts steps per parameter and skips parameters without a gradient; ZeRO steps
        # flat partitions with one count: the largest saved count stands for all, and a parameter
        # the plain run never stepped starts from zero moments
        self._fresh_optimizer_state(max(float(entry["step"]) for entry in state["state"].values()))
        for i, (_, param) in enumerate(self.module.named_parameters()):
            entry = state["state"].get(i)
            if entry is None:
                continue
            for key in ("exp_avg", "exp_avg_sq"):
                self._set_full(param, entry[key].to(torch.float32), key, safe_set_full_optimizer_state)

    # ------------------------------------------------------------------ the end of training
    def settle(self, ema: ShardedEMA | None) -> None:
        """Training is over: the module keeps the weights to deploy from now on (the EMA's when on;
        under ZeRO-3 still partitioned, so every rank can sample them together). Collective."""
        if ema is not None:
            self._publish(ema.flats)

    def plain_model(self, model: FlowModel) -> FlowModel:
        """ZeRO-3: ``model`` around a plain copy of the trained module's structure, its parameters
        allocated (uninitialised) on the module's device, for rank 0 to load the exported final
        weights into once training is over; ZeRO-1/2: ``model`` (its weights are whole)."""
        if self._skeleton is None:
            return model
        made: dict[int, torch.nn.Parameter] = {}
        for owner in self._skeleton.modules():
            for attr, param in list(owner._parameters.items()):
                if param is not None and param.device.type == "meta":
                    if id(param) not in made:
                        made[id(param)] = torch.nn.Parameter(
                            torch.empty(param.shape, dtype=param.dtype, device=self._device),
                            requires_grad=param.requires_grad)
                    owner._parameters[attr] = made[id(param)]
        return _wrapped_view(model, self._attr, self._skeleton)

    def _release(self) -> None:
        """Free the optimizer's state once training is over: the fp32 masters, AdamW's moments and
        the EMA's partitions (the module keeps its training-dtype weights)."""
        base = self._base()
        base.state.clear()
        for master in self.master_flats():
            master.grad = None
            master.data = torch.empty(0, dtype=master.dtype, device=master.device)
        if not self.partitioned:  # ZeRO-1/2 keep views of the masters and moments on every parameter
            for param in self.module.parameters():
                if getattr(param, "_hp_mapping", None) is not None:
                    param._hp_mapping = None
        if self._ema is not None:
            self._ema.flats = []

    def close(self) -> None:
        """Free the optimizer state (the engine cannot step after this) and leave a process group
        the engine made for itself."""
        if not self._released:
            self._release()
            self._released = True
        if self._own_group and dist.is_initialized():
            from flowrl.rl.distributed import destroy

            destroy()
            self._own_group = False
        if self._own_local_rank:
            os.environ.pop("LOCAL_RANK", None)
            self._own_local_rank = False


def _meta_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``module`` whose parameters are on the meta device (no memory); buffers are
    copied as they are (small, and not all of them are in the state dict)."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in module.parameters()}
    return copy.deepcopy(module, memo)


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
    ``trainable``: name patterns of the parameters trained (:func:`freeze_except`; empty: all).
    ``ema``: whether the run keeps an EMA, which every engine supports (build it with the
    engine's ``make_ema``: under ZeRO it is sharded like the optimizer state)."""
    if trainable and zero_stage > 0:
        raise ValueError(f"{where}.trainable with {where}.optim.zero_stage = {zero_stage}: a subset of the parameters "
                         "is trained with zero_stage 0 only (the full-format loading of the ZeRO engines "
                         "expects AdamW moments for every parameter)")
    trained = freeze_except(module, trainable, where)
    if trainable:
        total = sum(p.numel() for p in module.parameters())
        log.info("%s.trainable: training %d of %d parameters (%.1f %%), matching %s", where, trained, total,
                 100.0 * trained / total, ", ".join(trainable))
    if zero_stage == 0:
        return TorchEngine(module, lr=lr, weight_decay=weight_decay, grad_clip=grad_clip)
    return ZeroEngine(module, lr=lr, weight_decay=weight_decay, grad_clip=grad_clip, zero_stage=zero_stage,
                      model=model)
