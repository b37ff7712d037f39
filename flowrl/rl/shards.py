"""Sharded checkpoints of the ZeRO engines: one file per rank, and the
offline step that turns them back into the full format.

A ZeRO rank owns one slice of every flat partition DeepSpeed steps: the fp32
master weights, AdamW's two moments and (when on) the EMA, all in fp32. A
sharded checkpoint stores exactly that per rank, in
``rank-00000-of-00008.safetensors`` and its siblings, plus ``sharded.json``
(the parameters' names, shapes and dtypes, written by rank 0). Each rank file
says, in its safetensors metadata, where every piece of a parameter sits in
its flat tensors (a *fragment*: parameter, flat tensor, start in that tensor,
start in the flattened parameter, length), so putting a parameter back
together needs no knowledge of how DeepSpeed laid the partitions out.

The bf16 (training dtype) weights are not stored: after every step DeepSpeed
casts the fp32 masters into them, so they are re-derived on load (and by
:func:`consolidate`). Buffers, and any parameter the optimizer does not step,
are stored as they are (rank 0 for whole tensors; under ZeRO-3 a frozen
parameter's partition by each rank).

:func:`consolidate` reads the rank files of one checkpoint (one process, on
the CPU, one parameter at a time from memory-mapped files) and returns the
full weights, the torch AdamW state dict and the EMA weights: the full format
the plain engine reads (``flowrl consolidate``).
"""

from __future__ import annotations

import io
import json
import math
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from flowrl.models import CheckpointError
from flowrl.storage import ArtifactError

SHARDED = "sharded.json"  # the layout of a sharded checkpoint; its presence marks the format
SHARD_FORMAT = 1
SHARD_META_KEY = "flowrl.shard"  # the safetensors metadata entry holding a rank file's fragments
KINDS = ("fp32", "exp_avg", "exp_avg_sq")  # the per-group flat tensors every rank writes (``ema`` when on)
_CHUNK_ELEMENTS = 1 << 24  # at most this many elements of a tensor are copied to host memory at a time

_DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_SAME_WIDTH_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # how bytes of dtypes numpy lacks are read


class ShardError(ArtifactError):
    """A sharded checkpoint that cannot be read as asked; the message names the file and what to do."""


def shard_name(rank: int, world: int) -> str:
    return f"rank-{rank:05d}-of-{world:05d}.safetensors"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_of(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ShardError(f"unknown dtype {name!r} in a sharded checkpoint")
    return dtype


# --------------------------------------------------------------------------- streaming safetensors writer


class SafetensorsWriter:
    """A safetensors file written one tensor at a time, in the order declared.

    The header (names, dtypes, shapes, offsets) is written first from the
    declared ``specs``; each :meth:`add` then streams one tensor's bytes in
    chunks of at most 16 M elements, so a tensor on an accelerator, or a
    view into a larger flat buffer, is never copied whole to host memory
    (``safetensors.torch.save_file`` needs every tensor at once and refuses
    views sharing storage). Readable by ``safetensors.safe_open``."""

    def __init__(self, path: str | Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        header: dict[str, object] = {}
        offset = 0
        self._order = []
        for name, dtype, shape in specs:
            if dtype not in _DTYPE_CODES:
                raise ShardError(f"{path}: {name}: dtype {dtype} cannot be written to safetensors")
            if name in header or name == "__metadata__":
                raise ShardError(f"{path}: tensor name {name!r} is declared twice or reserved")
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._order.append((name, dtype, tuple(shape), size))
            offset += size
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
        self.path = Path(path)
        self._fh: BinaryIO = open(self.path, "wb")
        self._fh.write(struct.pack("<Q", len(blob)))
        self._fh.write(blob)
        self._next = 0
        self.bytes = 8 + len(blob) + offset

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order):
            raise ShardError(f"{self.path}: {name}: every declared tensor is already written")
        expected, dtype, shape, size = self._order[self._next]
        if name != expected or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ShardError(f"{self.path}: got {name} {tensor.dtype} {tuple(tensor.shape)}, expected "
                             f"{expected} {dtype} {shape} next")
        flat = tensor.detach().reshape(-1)
        written = 0
        for start in range(0, flat.numel(), _CHUNK_ELEMENTS):
            piece = flat[start:start + _CHUNK_ELEMENTS].to("cpu").contiguous()
            if piece.dtype in (torch.bfloat16,):  # numpy has no bfloat16: the same bytes as int16
                piece = piece.view(_SAME_WIDTH_INT[piece.element_size()])
            data = piece.numpy().tobytes() if piece.dtype == torch.bool else memoryview(piece.numpy()).cast("B")
            self._fh.write(data)
            written += len(data)
        if written != size:
            raise ShardError(f"{self.path}: {name}: wrote {written} bytes, expected {size}")
        self._next += 1

    def close(self) -> None:
        try:
            if self._next != len(self._order):
                missing = ", ".join(name for name, *_ in self._order[self._next:][:3])
                raise ShardError(f"{self.path}: closed with {len(self._order) - self._next} declared tensor(s) "
                                 f"unwritten ({missing}, ...)")
        finally:
            self._fh.close()

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._fh.close()


def read_into(handle, key: str, target: torch.Tensor) -> None:
    """Copy tensor ``key`` of an open safetensors file into ``target`` (1-D, same size), at most
    16 M elements at a time: a flat partition on an accelerator is never read whole into host memory."""
    source = handle.get_slice(key)
    if source.get_shape() != [target.numel()]:
        raise ShardError(f"{key}: shape {source.get_shape()} in the file, {list(target.shape)} in this run")
    for start in range(0, target.numel(), _CHUNK_ELEMENTS):
        stop = min(start + _CHUNK_ELEMENTS, target.numel())
        target[start:stop].copy_(source[start:stop])


# --------------------------------------------------------------------------- what one rank file holds


@dataclass(frozen=True)
class Fragment:
    """One rank's piece of a trained parameter: ``numel`` elements of the
    flattened parameter from ``param_start`` sit in the rank's flat tensors
    of group ``group`` (``fp32.<group>``, ``exp_avg.<group>``, ...) from
    ``flat_start``."""

    name: str
    group: int
    flat_start: int
    param_start: int
    numel: int


@dataclass(frozen=True)
class FrozenPiece:
    """A parameter the optimizer does not step: ``frozen.<name>`` of a rank
    file holds ``numel`` elements of it from ``param_start``."""

    name: str
    param_start: int
    numel: int


def shard_metadata(rank: int, world: int, zero_stage: int, groups: int, fragments: list[Fragment],
                   frozen: list[FrozenPiece]) -> dict[str, str]:
    return {SHARD_META_KEY: json.dumps({
        "format": SHARD_FORMAT, "rank": rank, "world": world, "zero_stage": zero_stage, "groups": groups,
        "fragments": [[f.name, f.group, f.flat_start, f.param_start, f.numel] for f in fragments],
        "frozen": [[p.name, p.param_start, p.numel] for p in frozen],
    })}


def read_shard_metadata(path: Path) -> dict:
    """The fragments a rank file says it holds, checked against their schema (a ShardError naming the
    file and the field otherwise)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            raw = (handle.metadata() or {}).get(SHARD_META_KEY)
    except Exception as exc:  # safetensors raises its own error types for a corrupt file
        raise ShardError(f"{path}: unreadable safetensors file ({str(exc)[:200]})") from None
    if raw is None:
        raise ShardError(f"{path}: not a flowrl rank file (no {SHARD_META_KEY} metadata)")
    where = f"{path}: {SHARD_META_KEY}"
    meta = _json_object(raw, where)
    for key in ("format", "rank", "world", "zero_stage", "groups"):
        _bounded_int(meta, key, where, MAX_WORLD if key in ("rank", "world") else MAX_COUNT)
    for key, width in (("fragments", 5), ("frozen", 3)):
        entries = meta.get(key)
        if not isinstance(entries, list):
            raise ShardError(f"{where}: {key}: expected a list, got {type(entries).__name__}")
        for i, entry in enumerate(entries):
            if (not isinstance(entry, list) or len(entry) != width or not isinstance(entry[0], str)
                    or not all(_is_count(v, MAX_ELEMENTS) for v in entry[1:])):
                raise ShardError(f"{where}: {key}[{i}]: expected [name, {width - 1} integers >= 0], "
                                 f"got {str(entry)[:80]}")
    meta["fragments"] = [Fragment(*entry) for entry in meta["fragments"]]
    meta["frozen"] = [FrozenPiece(*entry) for entry in meta["frozen"]]
    return meta


# Bounds of what a checkpoint's metadata may say (it is read from an artifact: untrusted input).
MAX_WORLD = 1 << 16  # ranks
MAX_COUNT = 1 << 20  # format, ZeRO stage, groups, one dimension of a tensor
MAX_ELEMENTS = 1 << 40  # elements of one tensor, or an offset into one
LAYOUT_MAX_BYTES = 256 << 20


def _is_count(value: object, limit: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limit


def _bounded_int(data: dict, key: str, where: str, limit: int) -> int:
    value = data.get(key)
    if not _is_count(value, limit):
        raise ShardError(f"{where}: {key}: expected an integer in 0..{limit}, got {str(value)[:80]}")
    return value


def _json_object(text: str | bytes, where: str) -> dict:
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ShardError(f"{where}: unreadable JSON ({str(exc)[:200]})") from None
    if not isinstance(data, dict):
        raise ShardError(f"{where}: expected a JSON object, got {type(data).__name__}")
    return data


def read_layout(directory: Path) -> dict:
    """``sharded.json`` of a checkpoint directory, checked against its schema: ``format``, ``world``
    (1..65536), ``zero_stage`` (1..3), ``ema`` (bool), ``params`` ({name, shape, dtype, trained}),
    ``buffers`` and ``state_keys`` (names); a ShardError naming the file and the field otherwise."""
    path = directory / SHARDED
    if path.stat().st_size > LAYOUT_MAX_BYTES:
        raise ShardError(f"{path}: {path.stat().st_size} bytes, more than a layout may hold ({LAYOUT_MAX_BYTES})")
    layout = _json_object(path.read_bytes(), str(path))
    if layout.get("format") != SHARD_FORMAT:
        raise ShardError(f"{path}: format {str(layout.get('format'))[:40]}, expected {SHARD_FORMAT}")
    if _bounded_int(layout, "world", str(path), MAX_WORLD) < 1:
        raise ShardError(f"{path}: world: expected at least 1 rank, got 0")
    if layout.get("zero_stage") not in (1, 2, 3) or isinstance(layout.get("zero_stage"), bool):
        raise ShardError(f"{path}: zero_stage: expected 1, 2 or 3, got {str(layout.get('zero_stage'))[:40]}")
    if not isinstance(layout.get("ema"), bool):
        raise ShardError(f"{path}: ema: expected true or false, got {str(layout.get('ema'))[:40]}")
    params = layout.get("params")
    if not isinstance(params, list):
        raise ShardError(f"{path}: params: expected a list, got {type(params).__name__}")
    for i, entry in enumerate(params):
        ok = (isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("dtype"), str)
              and isinstance(entry.get("trained"), bool) and isinstance(entry.get("shape"), list)
              and all(_is_count(d, MAX_ELEMENTS) for d in entry["shape"]))
        if not ok:
            raise ShardError(f"{path}: params[{i}]: expected {{name: str, shape: [int >= 0], dtype: str, "
                             f"trained: bool}}, got {str(entry)[:80]}")
        if math.prod(entry["shape"]) > MAX_ELEMENTS:
            raise ShardError(f"{path}: params[{i}] ({entry['name'][:80]}): shape {entry['shape']} has more than "
                             f"{MAX_ELEMENTS} elements")
        if not isinstance(getattr(torch, entry["dtype"], None), torch.dtype):
            raise ShardError(f"{path}: params[{i}] ({entry['name'][:80]}): unknown dtype {entry['dtype'][:40]!r}")
    for key in ("buffers", "state_keys"):
        names = layout.get(key)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ShardError(f"{path}: {key}: expected a list of names, got {str(names)[:80]}")
    return layout


def read_trainer_file(path: Path, required: tuple[str, ...]) -> dict:
    """A checkpoint's ``trainer.pt``: tensors and plain containers only (``weights_only``: a pickle that
    would build any other object, which could run code, is refused) holding the ``required`` keys and a
    CPU RNG state ``torch_rng`` of this torch's size; a one-line CheckpointError naming the file otherwise."""
    try:
        data = torch.load(io.BytesIO(path.read_bytes()), weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line), "")
        raise CheckpointError(f"{path}: refused: it holds Python objects other than tensors and plain containers "
                              f"(never unpickled, that could run code){': ' + detail[:200] if detail else ''}"
                              ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable torch file ({first})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a mapping, got {type(data).__name__}")
    for key in ("torch_rng",) + required:
        if key not in data:
            raise CheckpointError(f"{path}: {key}: required key missing")
    rng, expected = data["torch_rng"], torch.get_rng_state()
    if not torch.is_tensor(rng) or rng.dtype != torch.uint8 or tuple(rng.shape) != tuple(expected.shape):
        got = f"{rng.dtype} {tuple(rng.shape)}" if torch.is_tensor(rng) else type(rng).__name__
        raise CheckpointError(f"{path}: torch_rng: expected a uint8 tensor of shape {tuple(expected.shape)} "
                              f"(torch's CPU generator state), got {got}")
    if "optimizer" in required:
        optimizer = data["optimizer"]
        if (not isinstance(optimizer, dict) or not isinstance(optimizer.get("state"), dict)
                or not isinstance(optimizer.get("param_groups"), list)):
            raise CheckpointError(f"{path}: optimizer: expected a torch optimizer state dict "
                                  "({state: ..., param_groups: [...]})")
    if "param_groups" in required:
        groups = data["param_groups"]
        if not isinstance(groups, list) or not groups or not all(isinstance(g, dict) for g in groups):
            raise CheckpointError(f"{path}: param_groups: expected a non-empty list of mappings")
    return data


# --------------------------------------------------------------------------- consolidation


@dataclass
class FullCheckpoint:
    """A sharded checkpoint in the full format: module state dict (training
    dtype), torch AdamW state dict (parameters numbered in
    ``module.named_parameters()`` order) and, when the run kept one, the EMA
    as a module state dict whose trained parameters are the fp32 averages."""

    weights: dict[str, torch.Tensor]
    optimizer: dict
    ema: dict[str, torch.Tensor] | None


def consolidate(directory: str | Path) -> FullCheckpoint:
    """Assemble the full format from the rank files of one sharded checkpoint
    (a local directory, as :func:`flowrl.storage.fetch` returns it)."""
    # long: validation of every rank file, then the assembly of trained fragments, frozen pieces and
    # optimizer states from them: one pass over the same open files
    from safetensors import safe_open

    directory = Path(directory)
    layout = read_layout(directory)
    world = layout["world"]
    paths = [directory / shard_name(rank, world) for rank in range(world)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise ShardError(f"{directory}: missing rank file(s) {', '.join(missing)} of {world}")
    metas = [read_shard_metadata(p) for p in paths]
    for rank, meta in enumerate(metas):
        if (meta["rank"], meta["world"]) != (rank, world):
            raise ShardError(f"{paths[rank]}: holds rank {meta['rank']} of {meta['world']}, expected {rank} of {world}")
    handles = [safe_open(str(p), "pt") for p in paths]
    trained: dict[str, list[tuple[int, Fragment]]] = {}
    frozen: dict[str, list[tuple[int, FrozenPiece]]] = {}
    for rank, meta in enumerate(metas):
        for fragment in meta["fragments"]:
            trained.setdefault(fragment.name, []).append((rank, fragment))
        for piece in meta["frozen"]:
            frozen.setdefault(piece.name, []).append((rank, piece))
    with_ema = bool(layout["ema"])
    kinds = KINDS + (("ema",) if with_ema else ())
    stepped = all(f"step.{g}" in handles[0].keys() for g in range(metas[0]["groups"])) and metas[0]["groups"] > 0

    def assemble(name: str, numel: int, dtype: torch.dtype, pieces, key_of) -> torch.Tensor:
        """The flattened parameter ``name`` from its pieces in the rank files (``key_of``: a piece's
        tensor name and start in it); every element must be covered exactly once."""
        covered = sum(piece.numel for _, piece in pieces)  # checked before anything is allocated
        if covered != numel or any(piece.param_start + piece.numel > numel for _, piece in pieces):
            raise ShardError(f"{directory}: the rank files hold {covered} of the {numel} elements of {name}")
        full = torch.empty(numel, dtype=dtype)
        for rank, piece in pieces:
            key, start = key_of(piece)
            full[piece.param_start:piece.param_start + piece.numel] = handles[rank].get_slice(key)[
                start:start + piece.numel]
        return full

    weights, ema, state = {}, {}, {}
    for index, entry in enumerate(layout["params"]):
        name, shape, dtype = entry["name"], tuple(entry["shape"]), dtype_of(entry["dtype"])
        numel = math.prod(shape)
        if entry["trained"]:
            pieces = trained.get(name, [])
            values = {kind: assemble(name, numel, torch.float32, pieces,
                                     lambda f, kind=kind: (f"{kind}.{f.group}", f.flat_start)).reshape(shape)
                      for kind in kinds}
            weights[name] = values["fp32"].to(dtype)
            if with_ema:
                ema[name] = values["ema"]
            if stepped:
                rank, first = pieces[0]
                state[index] = {"step": handles[rank].get_tensor(f"step.{first.group}"), "exp_avg": values["exp_avg"],
                                "exp_avg_sq": values["exp_avg_sq"]}
        else:
            pieces = frozen.get(name, [])
            value = assemble(name, numel, dtype, pieces, lambda p: (f"frozen.{p.name}", 0)).reshape(shape)
            weights[name] = value
            if with_ema:
                ema[name] = value
    for name in layout["buffers"]:
        weights[name] = handles[0].get_tensor(f"buffer.{name}")
        if with_ema:
            ema[name] = weights[name]
    order = layout["state_keys"]
    if set(order) != set(weights):
        raise ShardError(f"{directory}: assembled {len(weights)} tensors, the module's state dict has {len(order)}")
    trainer = read_trainer_file(directory / "trainer.pt", ("param_groups",))
    group = dict(trainer["param_groups"][0])
    group["params"] = list(range(len(layout["params"])))
    return FullCheckpoint(weights={k: weights[k] for k in order}, optimizer={"state": state, "param_groups": [group]},
                          ema={k: ema[k] for k in order} if with_ema else None)
