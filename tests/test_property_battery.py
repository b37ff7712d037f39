"""The hostile-input battery (issue 31, item 6): hypothesis generates configs, artifact manifests,
label tables and reward-server requests from their schemas, and every generated case must keep
the contract:

- a clear error of the project's own types (what the CLI turns into exit 2: ``USER_ERRORS``),
  of bounded length and naming the file, key, row or field; or a valid result, checked further
  than "no exception" (a config whose seeds a generator takes, a fetched artifact inside the
  store, a non-empty label dataset whose images decode, a 2xx with one finite score per image);
- nothing written outside the store: each case gets a fresh temporary tree, and everything in it
  outside ``store/`` is the same (paths, sizes, modification times, contents) before and after;
- bounded time: a wall-clock bound per case (and an alarm that turns a hang into a failure);
- bounded memory: the peak resident memory of the process doing the work (this one, or the
  reward server) is reset before each case (``/proc/PID/clear_refs``) and may grow at most
  ``MEMORY_BOUND`` during it. Peak RSS counts native allocations (pyarrow, numpy, torch) that
  tracemalloc misses, and unlike an address-space limit it is not tripped by thread arenas.

Seeds and sizes are fixed (``SEED``, ``EXAMPLES``; ``FLOWRL_BATTERY_SEED`` and
``FLOWRL_BATTERY_SCALE`` change them for exploration), no example database is used, so every run
tries the same cases. Each test records how many cases it generated and how many broke the
contract on its pytest item (``user_properties``), which tests/conftest.py sums into
``results/reliability.json`` (``generated``, ``failed``, ``seed``). A kind stops at its first broken
case and reports it as generated (shrinking takes minutes; ``FLOWRL_BATTERY_SHRINK=1`` turns it on,
and its reruns are not counted as generated cases).
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import dataclasses
import functools
import hashlib
import http.client
import io
import json
import math
import os
import re
import shutil
import signal
import tempfile
import threading
import time
import types
import typing
import urllib.parse
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, Phase, event, given, note, seed, settings
from hypothesis import strategies as st

from flowrl.cli import USER_ERRORS
from flowrl.config import FlowRLConfig, from_dict, load_config
from flowrl.rewards.annotations import (
    CATEGORIES,
    LIKERT_COLUMNS,
    PAIRWISE_COLUMNS,
    POINTWISE_COLUMNS,
    AnnotationError,
    decode_png,
    load_annotations,
    png_bytes,
)
from flowrl.storage import MANIFEST, fetch, unsafe_relpath

# What the code under test imports on first use (torch through the config's consistency checks, pyarrow's
# parquet reader) is imported here, so that no case is charged its import time and memory.
import flowrl.rl.rollout  # noqa: E402,F401  isort: skip
import pyarrow.parquet  # noqa: E402,F401  isort: skip

ROOT = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("FLOWRL_BATTERY_SEED", "31"))
SCALE = float(os.environ.get("FLOWRL_BATTERY_SCALE", "1"))
# cases per kind: the whole battery runs in about two minutes on 2 CPU cores
EXAMPLES = {"config": 800, "manifest": 600, "labels": 400, "request": 800}
# Shrinking a failure to a minimal case can take minutes; the suite reports the first failing case as
# generated (its note) and FLOWRL_BATTERY_SHRINK=1 shrinks it. FLOWRL_BATTERY_COLLECT=FILE records every
# broken case (one JSON line each) instead of stopping at the first: for surveying, not for the suite.
PHASES = (Phase.explicit, Phase.generate) + ((Phase.shrink,) if os.environ.get("FLOWRL_BATTERY_SHRINK") else ())
COLLECT = os.environ.get("FLOWRL_BATTERY_COLLECT")
TIME_BOUND_S = 5.0  # one case's wall clock (a config load, a fetch, a table load, a request)
HANG_S = 30.0  # past this an alarm stops the case
MEMORY_BOUND = 512 * 2**20  # growth of the worker's peak RSS during one case
MAX_MESSAGE_CHARS = 4000  # an error message quotes values cut short, so it stays readable


def battery(kind: str):
    """The settings of one kind: fixed seed, no database, our own time bound instead of hypothesis'
    deadline (so a slow case is counted as a contract failure like any other)."""
    def decorate(test):
        test = settings(max_examples=max(1, round(EXAMPLES[kind] * SCALE)), deadline=None, database=None,
                        phases=PHASES,
                        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                               HealthCheck.data_too_large, HealthCheck.large_base_example],
                        print_blob=True)(test)
        return seed(SEED)(test)
    return decorate


# --------------------------------------------------------------------------- the contract's bounds


class _Hang(BaseException):
    """Raised by the alarm; a BaseException so that no `except Exception` in the code under test eats it."""


def _status_kib(pid: int | str, key: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def _reset_peak_rss(pid: int | str) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as handle:  # "5": reset the peak RSS to the current RSS
        handle.write("5")


@contextlib.contextmanager
def _alarm(seconds: float):
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def ring(signum, frame):
        raise _Hang()

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclasses.dataclass
class Tally:
    """Cases generated and contract failures of one test (not counting hypothesis' shrinking reruns)."""

    kind: str
    generated: int = 0
    failed: int = 0
    shrinking: bool = False

    @contextlib.contextmanager
    def case(self, description: str, pid: int | str = "self"):
        """One generated case: counted, timed, its memory bounded; any exception out of it breaks the contract."""
        note(description)
        if COLLECT:
            try:
                with self._case(pid):
                    yield
            except Exception as exc:  # noqa: BLE001 - surveying: record it and go on
                with open(COLLECT, "a") as out:
                    out.write(json.dumps({"test": self.kind, "error": f"{type(exc).__name__}: {exc!s:.600}",
                                          "case": description[:3000]}) + "\n")
            return
        with self._case(pid):
            yield

    @contextlib.contextmanager
    def _case(self, pid: int | str):
        counted = not self.shrinking
        self.generated += counted
        try:
            _reset_peak_rss(pid)
            start_rss = _status_kib(pid, "VmRSS")
            start = time.monotonic()
            try:
                with _alarm(HANG_S):
                    yield
            except _Hang:
                raise AssertionError(f"the case ran past {HANG_S} s") from None
            elapsed = time.monotonic() - start
            assert elapsed <= TIME_BOUND_S, f"the case took {elapsed:.1f} s (bound {TIME_BOUND_S} s)"
            grown = _status_kib(pid, "VmHWM") - start_rss
            assert grown <= MEMORY_BOUND, f"peak RSS grew by {grown / 2**20:.0f} MiB (bound {MEMORY_BOUND / 2**20:.0f})"
        except BaseException:
            if counted:
                self.failed += 1
                self.shrinking = not COLLECT  # what runs after a failure is hypothesis shrinking it
            raise


@pytest.fixture
def tally(request):
    """The counts of this test, put on its item for the reliability report (also under xdist)."""
    count = Tally(request.node.name)
    yield count
    request.node.user_properties.append(
        ("property_battery", {"generated": count.generated, "failed": count.failed, "seed": SEED}))


def _error_is_clear(exc: BaseException, *names: str) -> None:
    """A user error: one of USER_ERRORS, a bounded message that names one of ``names`` (file, URI, key)."""
    assert isinstance(exc, USER_ERRORS), f"{type(exc).__name__} is not a user error: {exc!r:.300}"
    message = str(exc)
    assert message.strip(), f"{type(exc).__name__} with an empty message"
    assert len(message) <= MAX_MESSAGE_CHARS, f"a {len(message)}-character error message: {message[:300]!r}..."
    assert any(name and name in message for name in names), f"the message names none of {names}: {message[:300]!r}"


def _snapshot(root: Path, skip: Path) -> dict[str, tuple]:
    """Everything under ``root`` outside ``skip``: path -> (kind, size, mtime, content hash of files)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here == skip or skip in here.parents:
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            path = here / name
            if path == skip:
                continue
            info = path.lstat()
            digest = None
            if path.is_file() and not path.is_symlink():
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            out[str(path.relative_to(root))] = (info.st_mode, info.st_size, info.st_mtime_ns, digest)
    return out


def _assert_nothing_written_outside(before: dict, root: Path, store: Path) -> None:
    after = _snapshot(root, store)
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    assert not (added or removed or changed), (
        f"written outside the store {store}: added {added[:5]}, removed {removed[:5]}, changed {changed[:5]}")


@functools.cache
def _base() -> Path:
    """This process's directory of case trees (made on first use; a reward server importing us makes none)."""
    base = Path(tempfile.mkdtemp(prefix="flowrl-battery-"))
    atexit.register(shutil.rmtree, base, True)
    return base


@contextlib.contextmanager
def _case_tree():
    """A fresh tree for one case: ``root/outside/`` (a secret a hostile path aims at) and ``root/a/b/store``."""
    root = Path(tempfile.mkdtemp(dir=_base()))
    try:
        (root / "outside").mkdir()
        (root / "outside" / "secret.txt").write_text("not yours\n")
        store = root / "a" / "b" / "store"
        store.mkdir(parents=True)
        yield root, store
    finally:
        shutil.rmtree(root, ignore_errors=True)


ABS = "{ABS}"  # stands for the case tree's absolute root in generated paths


# --------------------------------------------------------------------------- values hostile to any schema

LONG = 20_000
# Big values are drawn as tokens "{TEXT*N}" and expanded where a case is built (big(), _resolve()), so that
# hypothesis' report of a failing case stays readable.
_BIG = re.compile(r"\{(.+?)\*(\d+)\}")


def big(text: str) -> str:
    """``text`` with every "{TEXT*N}" token replaced by TEXT repeated N times."""
    return _BIG.sub(lambda m: m.group(1) * int(m.group(2)), text)


HOSTILE_STRINGS = ["", " ", "../x", "../../outside/secret.txt", "a/../../b", "..", ".", "/etc/passwd",
                   f"{ABS}/outside/secret.txt", "a\x00b", "\x00", f"{{x*{LONG}}}", "{é*1000}", "a\nb", "\\..\\x",
                   "s3://bucket/k", "file::/etc", "memory://x", "${HOME}", "~root", "-rf", "*", "null", "1e999",
                   "\u202e", "{😀*100}"]
HUGE_INTS = [2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 2**70, 10**100, -1, -(2**31), -(2**63) - 1, -(2**70)]
ODD_FLOATS = [math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, -0.0, 1e-300, 2.0**63]

scalar_junk = st.one_of(st.none(), st.booleans(), st.sampled_from(HUGE_INTS), st.sampled_from(ODD_FLOATS),
                        st.integers(-1000, 1000), st.floats(), st.sampled_from(HOSTILE_STRINGS),
                        st.text(max_size=30))
junk = st.recursive(scalar_junk, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=8), inner, max_size=4), max_leaves=10)


# --------------------------------------------------------------------------- 1. configs


@dataclasses.dataclass(frozen=True)
class Leaf:
    path: tuple[str, ...]
    tp: typing.Any
    bounds: dict


def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _walk(cls, prefix=()) -> tuple[list[Leaf], list[tuple[str, ...]]]:
    """Leaves (with type and bounds) and sections (mapping paths) of a config dataclass."""
    leaves, sections = [], [prefix]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            sub_leaves, sub_sections = _walk(tp, prefix + (f.name,))
            leaves += sub_leaves
            sections += sub_sections
        else:
            leaves.append(Leaf(prefix + (f.name,), hints[f.name], dict(f.metadata.get("bounds", {}))))
    return leaves, sections


LEAVES, SECTION_PATHS = _walk(FlowRLConfig)
SECTIONS = [f.name for f in dataclasses.fields(FlowRLConfig)]


def _valid(tp, bounds) -> st.SearchStrategy:
    """Values the schema allows (some of them at its bounds)."""
    tp, optional = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if origin is Literal:
        inner = st.sampled_from(typing.get_args(tp))
    elif origin is tuple:
        inner = st.lists(_valid(typing.get_args(tp)[0], {}), max_size=4).map(list)
    elif tp is bool:
        inner = st.booleans()
    elif tp is int:
        lo = bounds.get("ge", bounds["gt"] + 1 if "gt" in bounds else -(2**31))
        hi = bounds.get("le", bounds["lt"] - 1 if "lt" in bounds else lo + 2**31)
        inner = st.one_of(st.integers(lo, min(hi, lo + 64)), st.just(lo), st.just(hi), st.integers(lo, hi))
    elif tp is float:
        lo = bounds.get("ge", bounds.get("gt", -1e6))
        hi = bounds.get("le", bounds.get("lt", lo + 1e6))
        inner = st.floats(lo, hi, exclude_min="gt" in bounds, exclude_max="lt" in bounds, allow_nan=False)
    elif tp is str:
        inner = st.one_of(st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,20}", fullmatch=True), st.text(max_size=20))
    elif dataclasses.is_dataclass(tp):
        inner = st.just({})
    else:
        raise TypeError(f"no strategy for {tp}")
    return st.one_of(st.none(), inner) if optional else inner


def _edges(bounds) -> list:
    """Numbers at and just past each bound."""
    out = []
    for value in bounds.values():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out += [value, value - 1, value + 1, math.nextafter(value, -math.inf), math.nextafter(value, math.inf)]
    return out


def _hostile(leaf: Leaf) -> st.SearchStrategy:
    """Values at and past the type's limits, of the wrong type, and strings that would make bad paths."""
    return st.one_of(st.sampled_from(_edges(leaf.bounds) or [0]), st.sampled_from(HUGE_INTS),
                     st.sampled_from(ODD_FLOATS), st.sampled_from(HOSTILE_STRINGS), junk,
                     st.lists(st.sampled_from(HOSTILE_STRINGS + ["a=../../x", "t2i=../x", "=", "x=", "=y"]),
                              max_size=3))


def _base_document(root: Path) -> dict:
    data = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    data["run"]["artifact_root"] = str(root / "a" / "b" / "store")
    data["run"]["tracking_uri"] = f"sqlite:///{root / 'a' / 'b' / 'store' / 'mlflow.db'}"
    return data


def _resolve(value, root: Path):
    """Generated values with ABS replaced by the case tree's root."""
    if isinstance(value, str):
        return big(value.replace(ABS, str(root)))
    if isinstance(value, list):
        return [_resolve(v, root) for v in value]
    if isinstance(value, dict):
        return {_resolve(k, root): _resolve(v, root) for k, v in value.items()}
    return value


def _set(data: dict, path: tuple[str, ...], value) -> None:
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[path[-1]] = value


valid_mutation = st.tuples(st.just("value"), st.sampled_from(LEAVES).flatmap(
    lambda leaf: st.tuples(st.just(leaf.path), _valid(leaf.tp, leaf.bounds))))
mutation = st.one_of(
    valid_mutation,
    st.tuples(st.just("hostile"), st.sampled_from(LEAVES).flatmap(lambda leaf: st.tuples(st.just(leaf.path),
                                                                                        _hostile(leaf)))),
    st.tuples(st.just("unknown key"), st.tuples(
        st.sampled_from(SECTION_PATHS),
        st.one_of(st.sampled_from(["bogus", "../x", "", "seed ", "__class__", f"{{x*{LONG}}}"]),
                                                  st.text(max_size=12)), junk)),
    st.tuples(st.just("section"), st.tuples(st.sampled_from([p for p in SECTION_PATHS if p]), junk)),
)

raw_yaml = st.one_of(
    st.integers(1, 6).map(lambda levels: "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(levels))),
    st.binary(max_size=300),
    st.sampled_from([b"\xff\xfe\x00r\x00u\x00n", b"run: {name: \xc3\x28}", b"\x00\x00", b"---\n...\n", b"[]",
                     b"- 1\n- 2", b"run: !!python/object:os.system {}", b"run: &x {name: *x}",
                     "[{0,*200000}0]", "{[*5000}{]*5000}"]),
)

override_entry = st.one_of(
    st.tuples(st.sampled_from(LEAVES), st.one_of(st.sampled_from(HUGE_INTS), st.sampled_from(ODD_FLOATS),
                                                 st.sampled_from(HOSTILE_STRINGS), junk)).map(
        lambda pair: ".".join(pair[0].path) + "=" + (json.dumps(pair[1]) if not isinstance(pair[1], float)
                                                     else repr(pair[1]).replace("nan", ".nan").replace("inf", ".inf"))),
    st.sampled_from(["noequals", "=1", "run..seed=1", "run.seed", "run.seed=[", "run.seed=2**70",
                     "run.seed=1180591620717411303424", "run=1", "run.name=../../x", "run.seed.x=1",
                     f"run.name={{x*{LONG}}}", "grpo.seed=-5", "filter.seed=-1", "opd.seed=-3"]),
    st.text(max_size=30),
)


def _seed_fields(config) -> list[tuple[str, int]]:
    return [(".".join(leaf.path), _get(config, leaf.path)) for leaf in LEAVES if leaf.path[-1] == "seed"]


def _get(config, path):
    value = config
    for part in path:
        value = getattr(value, part, None)
    return value


def _assert_valid_config(config) -> None:
    """What a stage will do with an accepted config must not fail on a value the loader let through."""
    assert isinstance(config, FlowRLConfig)
    for leaf in LEAVES:
        value = _get(config, leaf.path)
        values = value if isinstance(value, tuple) else (value,)
        for item in values:
            if isinstance(item, int) and not isinstance(item, bool):
                assert -(2**63) <= item < 2**63, f"{'.'.join(leaf.path)} = {item} does not fit in 64 bits"
            if isinstance(item, float):
                assert math.isfinite(item), f"{'.'.join(leaf.path)} = {item}"
    for key, value in _seed_fields(config):
        if value is not None:
            try:
                np.random.SeedSequence(value)
                np.random.default_rng(value)
            except (ValueError, TypeError, OverflowError) as exc:
                raise AssertionError(f"{key} = {value} was accepted, and a random generator refuses it: {exc}")
    assert from_dict(FlowRLConfig, config.to_dict()) == config  # the accepted values round-trip
    config.section_hash(*SECTIONS)


@pytest.mark.bad_input
@battery("config")
@given(mutations=st.one_of(st.lists(mutation, max_size=4), st.lists(valid_mutation, max_size=3)),
       raw=st.integers(0, 5).flatmap(lambda i: raw_yaml if i == 0 else st.none()),
       overrides=st.integers(0, 2).flatmap(lambda i: st.lists(override_entry, min_size=1, max_size=2) if i == 0
                                           else st.just([])), as_bytes=st.booleans())
def test_generated_configs_load_or_fail_clearly(tally, mutations, raw, overrides, as_bytes):
    with _case_tree() as (root, store):
        path = root / "config.yaml"
        if raw is not None:
            path.write_bytes(raw if isinstance(raw, bytes) else big(raw).encode())
        else:
            data = _base_document(root)
            for kind, (where, *rest) in mutations:
                if kind in ("value", "hostile"):
                    _set(data, where, _resolve(rest[0], root))
                elif kind == "unknown key":
                    _set(data, where + (_resolve(rest[0], root),), _resolve(rest[1], root))
                else:
                    _set(data, where, _resolve(rest[0], root))
            text = yaml.safe_dump(data, allow_unicode=as_bytes)
            path.write_text(text)
        overrides = [_resolve(o, root) for o in overrides]
        description = f"config file: {path.read_bytes()[:2000]!r}; overrides {[o[:200] for o in overrides]}"
        before = _snapshot(root, store)
        with tally.case(description):
            try:
                config = load_config(path, overrides)
            except Exception as exc:  # noqa: BLE001 - the contract decides what is acceptable
                event(f"refused: {type(exc).__name__}")
                _error_is_clear(exc, str(path), "--set", *(f"{name}." for name in SECTIONS))
            else:
                event("accepted")
                _assert_valid_config(config)
            _assert_nothing_written_outside(before, root, store)


# --------------------------------------------------------------------------- 2. manifests

SAFE_REL = st.from_regex(r"[a-z]{1,8}(/[a-z]{1,8}){0,2}\.bin", fullmatch=True)
HOSTILE_RELS = ["../x", "../../outside/secret.txt", "../../../outside/pwned", "a/../../b", "./a", "a//b", "", ".",
                "..", "a\\..\\b", "a\x00b", "memory::x", "file::/tmp/x", "~/x", "a/", "/", " ", "\n", "{x*300}",
                "{b/*600}c", "{x*300000}", f"{ABS}/outside/pwned", f"{ABS}/outside/secret.txt",
                "/etc/passwd", "/proc/self/environ", "s3://bucket/key", "%2e%2e/x", "\u2024\u2024/x"]
rel_path = st.one_of(SAFE_REL, st.sampled_from(HOSTILE_RELS), st.text(max_size=20))
name_value = st.one_of(st.from_regex(r"[a-z0-9]{1,12}", fullmatch=True), st.sampled_from(HOSTILE_RELS), junk)
files_entry = st.fixed_dictionaries(
    {"content": st.binary(max_size=64), "sha": st.sampled_from(["right", "wrong", "junk"]),
     "bytes": st.one_of(st.just("right"), junk)})


@st.composite
def manifests(draw):
    """(manifest JSON-able dict, raw bytes instead of it or None, {rel: content}, symlinks {rel: target}, mode)."""
    hostility = draw(st.sampled_from([0, 10, 50]))  # percent of the fields drawn hostile

    def choose(valid, hostile):
        return hostile if draw(st.integers(0, 99)) < hostility else valid

    def field(valid, hostile):
        return draw(choose(valid, hostile))

    entry = choose(st.fixed_dictionaries({"content": st.binary(max_size=64), "sha": st.just("right"),
                                          "bytes": st.just("right")}), files_entry)
    files = draw(st.dictionaries(choose(SAFE_REL, st.one_of(rel_path, junk.map(str))), entry, max_size=4))
    payload = field(st.sampled_from(["", ".payload-0123"]), st.one_of(rel_path, junk))
    listed, contents = {}, {}
    for rel, entry in files.items():
        digest = hashlib.sha256(entry["content"]).hexdigest()
        listed[rel] = {"sha256": {"right": digest, "wrong": "0" * 64, "junk": draw(junk)}[entry["sha"]],
                       "bytes": len(entry["content"]) if entry["bytes"] == "right" else entry["bytes"]}
        contents[rel] = entry["content"]
    manifest = {"format": field(st.just(1), junk), "stage": field(st.just("base"), name_value),
                "version": field(st.just("v1"), name_value), "config_hash": field(st.just("h"), junk),
                "code_version": field(st.just("c"), junk),
                "inputs": field(st.just({}), st.one_of(st.dictionaries(st.text(max_size=6), name_value, max_size=2),
                                                       junk)),
                "files": field(st.just(listed), junk), "created_unix": field(st.just(1.0), st.one_of(
                    st.sampled_from(ODD_FLOATS + HUGE_INTS), junk)),
                "extra": field(st.just({}), junk), "payload": payload}
    if hostility:
        for key in draw(st.lists(st.sampled_from(sorted(manifest)), max_size=2)):
            manifest.pop(key, None)
        manifest.update(draw(st.dictionaries(st.sampled_from(["junk", "__init__", "format ", "files\x00"]), junk,
                                             max_size=2)))
    raw = field(st.none(), st.one_of(st.binary(max_size=100), st.sampled_from(
        [b"[]", b"null", b"{", b"\xff\xfe", b'{"format": 1}', b"1e999", "{[*100000}{]*100000}"])))
    # local artifacts: listed files (or the payload directory) that are symbolic links leading out
    targets = st.sampled_from([f"{ABS}/outside/secret.txt", f"{ABS}/outside", "../../../../outside/secret.txt",
                               "/etc/passwd"])
    candidates = sorted(rel for rel in files if isinstance(rel, str) and unsafe_relpath(rel) is None)
    if isinstance(payload, str) and payload and unsafe_relpath(payload) is None:
        candidates.append(payload)
    links = draw(st.dictionaries(st.sampled_from(candidates), targets, max_size=2)) if candidates else {}
    mode = draw(st.sampled_from(["remote", "local"]))
    return manifest, raw, contents, links, mode


def _write_source(put, base: str, payload, rel, content: bytes) -> None:
    """Put a listed file where a reader following the manifest would look (if such a name can exist)."""
    if not isinstance(rel, str) or not isinstance(payload, str) or "\x00" in rel + payload or len(rel) > 4096:
        return
    with contextlib.suppress(Exception):
        put(base.rstrip("/") + "".join("/" + p.strip("/") for p in (payload, rel) if p), content)


@pytest.mark.bad_input
@battery("manifest")
@given(case=manifests())
def test_generated_manifests_fetch_inside_the_store_or_fail_clearly(tally, case):
    import fsspec

    manifest, raw, contents, links, mode = case
    with _case_tree() as (root, store):
        manifest = _resolve(manifest, root)
        contents = {_resolve(k, root): v for k, v in contents.items()}
        body = json.dumps(manifest, allow_nan=True).encode() if raw is None else raw if isinstance(raw, bytes) else \
            big(raw).encode()
        description = f"mode {mode}; manifest {body[:2000]!r}; links {links}"
        if mode == "remote":  # an object store (fsspec's in-memory one): fetch downloads into store/fetched
            memfs = fsspec.filesystem("memory")
            base = f"/battery-{root.name}/base/v1"
            uri, local_dir = f"memory://{base}", store / "fetched"
            memfs.pipe_file(f"{base}/{MANIFEST}", body)
            for rel, content in contents.items():
                _write_source(memfs.pipe_file, base, manifest.get("payload"), rel, content)
        else:  # a local store: the artifact is read in place
            artifact = store / "base" / "v1"
            artifact.mkdir(parents=True)
            uri, local_dir = str(artifact), None
            (artifact / MANIFEST).write_bytes(body)
            for rel, target in links.items():  # first, so that no listed file is written through one
                link = artifact / rel
                with contextlib.suppress(OSError):  # a parent of it is a link already
                    link.parent.mkdir(parents=True, exist_ok=True)
                    link.symlink_to(target.replace(ABS, str(root)))

            def put(path, data):
                target = Path(path)
                if store.resolve() not in target.resolve().parents or target.is_symlink():
                    return  # the case's own setup stays in the store
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)

            for rel, content in contents.items():
                _write_source(put, str(artifact), manifest.get("payload"), rel, content)
        before = _snapshot(root, store)
        try:
            with tally.case(description):
                try:
                    local = fetch(uri, local_dir)
                except Exception as exc:  # noqa: BLE001
                    event(f"{mode}: refused: {type(exc).__name__}")
                    _error_is_clear(exc, uri)
                else:
                    event(f"{mode}: fetched")
                    read = json.loads(body)
                    resolved_store = store.resolve()
                    assert resolved_store in Path(local).resolve().parents, f"fetched to {local}, outside {store}"
                    for rel in read["files"]:
                        path = (Path(local) / rel).resolve()
                        assert resolved_store in path.parents, f"file {rel!r:.100} resolves to {path}, outside"
                        assert path.is_file()
                _assert_nothing_written_outside(before, root, store)
        finally:
            if mode == "remote":
                with contextlib.suppress(FileNotFoundError):
                    fsspec.filesystem("memory").rm(f"/battery-{root.name}", recursive=True)


# --------------------------------------------------------------------------- 3. label tables

_PNG = png_bytes(np.full((4, 4, 3), 200, dtype=np.uint8))
_PNG_OTHER = png_bytes(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
BAD_BYTES = [b"", b"\x89PNG\r\n\x1a\n", _PNG[: len(_PNG) // 2], b"GIF89a" + b"\x00" * 20, b"x" * 1000,
             _PNG[:-12] + b"\x00" * 12]
CATEGORY_NAMES = sorted({c for cats in CATEGORIES.values() for c in cats})


@st.composite
def label_rows(draw, kind: str, count: int):
    """``count`` rows that follow the schema, as columns."""
    tasks = draw(st.lists(st.sampled_from(["t2i", "edit"]), min_size=count, max_size=count))
    columns = {"id": [f"r{i}" for i in range(count)], "task": tasks,
               "prompt": draw(st.lists(st.sampled_from(["a red circle", "remove the red square", "two blue stars"]),
                                       min_size=count, max_size=count)),
               "category": [draw(st.sampled_from(CATEGORIES[t])) for t in tasks],
               "source_image": [_PNG_OTHER if t == "edit" else None for t in tasks],
               "annotator": [f"ann{draw(st.integers(0, 3))}" for _ in tasks]}
    if kind == "pointwise":
        columns["image"] = [draw(st.sampled_from([_PNG, _PNG_OTHER])) for _ in tasks]
        for name in LIKERT_COLUMNS:
            columns[name] = draw(st.lists(st.integers(1, 5), min_size=count, max_size=count))
    else:
        columns["image_a"] = [_PNG] * count
        columns["image_b"] = [_PNG_OTHER] * count
        columns["preference"] = draw(st.lists(st.sampled_from(["a", "b", "tie"]), min_size=count, max_size=count))
        for name in PAIRWISE_COLUMNS:
            if name.startswith(("valid_", "text_distortion_", "figure_distortion_")):
                columns[name] = draw(st.lists(st.booleans(), min_size=count, max_size=count))
    return columns


def _cell_junk(name: str) -> st.SearchStrategy:
    """A bad cell of the column's own type (so the table can still be written)."""
    if name in LIKERT_COLUMNS:
        return st.one_of(st.sampled_from([0, 6, -1, 2**62, -(2**62)]), st.integers())
    if name.startswith(("image", "source_image")):
        return st.one_of(st.none(), st.sampled_from(BAD_BYTES), st.binary(max_size=40))
    if name.startswith(("valid_", "text_distortion_", "figure_distortion_")):
        return st.none()
    return st.one_of(st.none(), st.sampled_from(["", " ", f"{{x*{LONG}}}", "../x", "a\x00b", "r0", "T2I", "tie ",
                                                 *CATEGORY_NAMES]), st.text(max_size=10))


# how a whole column is stored: as the schema says, or as another type (the table must still be writable)
COLUMN_FORMS = ["schema"] * 6 + ["string", "float with NaN", "list", "bool", "all null", "missing", "large string"]


def _column(values: list, form: str, count: int):
    import pyarrow as pa

    if form == "schema":
        return pa.array(values)
    if form == "string":
        return pa.array([None if v is None else repr(v)[:50] for v in values], pa.string())
    if form == "large string":
        return pa.array(["y" * LONG] * count, pa.string())
    if form == "float with NaN":
        return pa.array([math.nan if i % 2 == 0 else 2.5 for i in range(count)], pa.float64())
    if form == "list":
        return pa.array([[1, 2]] * count, pa.list_(pa.int64()))
    if form == "bool":
        return pa.array([True] * count, pa.bool_())
    return pa.nulls(count)


@st.composite
def label_tables(draw):
    kind = draw(st.sampled_from(["pointwise", "pairwise"]))
    count = draw(st.integers(0, 6))
    columns = draw(label_rows(kind, count))
    for _ in range(draw(st.integers(0, 4)) if count else 0):  # bad cells
        name = draw(st.sampled_from(sorted(columns)))
        columns[name][draw(st.integers(0, count - 1))] = draw(_cell_junk(name))
    if count and draw(st.booleans()):  # a duplicate id
        columns["id"][-1] = columns["id"][0]
    forms = {name: draw(st.sampled_from(COLUMN_FORMS)) if draw(st.integers(0, 3)) == 0 else "schema"
             for name in columns}
    extra = draw(st.dictionaries(st.sampled_from(["group", "rationale", "junk"]),
                                 st.sampled_from(["string", "float with NaN", "list", "all null", "large string"]),
                                 max_size=2))
    file_form = draw(st.sampled_from(["parquet"] * 8 + ["csv", "garbage", "missing", "directory", "empty file"]))
    on_bad_row = draw(st.sampled_from(["fail", "skip"]))
    return kind, count, columns, forms, extra, file_form, on_bad_row


def _write_table(path: Path, count: int, columns: dict, forms: dict, extra: dict, file_form: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = {}
    for name, values in columns.items():
        values = [big(v) if isinstance(v, str) else v for v in values]
        if forms[name] == "missing":
            continue
        try:
            arrays[name] = _column(values, forms[name], count)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):  # cells of mixed types: stored as text
            arrays[name] = _column(values, "string", count)
    for name, form in extra.items():
        arrays[name] = _column([None] * count, form, count)
    table = pa.table(arrays) if arrays else pa.table({})
    if file_form == "parquet":
        pq.write_table(table, path)
    elif file_form == "csv":
        path.write_text(table.to_pandas().head(3).to_csv(index=False)[:100_000])
    elif file_form == "garbage":
        path.write_bytes(b"PAR1" + b"\x00" * 64 + b"PAR1")
    elif file_form == "directory":
        path.mkdir()
    elif file_form == "empty file":
        path.write_bytes(b"")


@pytest.mark.bad_input
@battery("labels")
@given(case=label_tables())
def test_generated_label_tables_load_or_fail_naming_the_file(tally, case):
    kind, count, columns, forms, extra, file_form, on_bad_row = case
    with _case_tree() as (root, store):
        path = store / f"{kind}.parquet"
        _write_table(path, count, columns, forms, extra, file_form)
        description = (f"{kind} {file_form} on_bad_row={on_bad_row} forms={forms} extra={extra} "
                       f"columns={ {k: [repr(v)[:40] for v in vs] for k, vs in columns.items()} }")
        before = _snapshot(root, store)
        with tally.case(description):
            try:
                frame, report = load_annotations(path, kind, on_bad_row)
            except Exception as exc:  # noqa: BLE001
                event(f"refused: {type(exc).__name__}")
                _error_is_clear(exc, str(path))
                assert isinstance(exc, AnnotationError), f"{type(exc).__name__}: {exc!s:.200}"
            else:
                event(f"loaded, on_bad_row={on_bad_row}, {'all rows' if report.kept == report.rows else 'some rows'}")
                assert len(frame) == report.kept and report.rows >= report.kept
                assert report.kept > 0, f"an empty {kind} dataset ({report.rows} rows, on_bad_row={on_bad_row})"
                if on_bad_row == "fail":
                    assert report.kept == report.rows
                images = ("image",) if kind == "pointwise" else ("image_a", "image_b")
                for _, row in frame.iterrows():  # what the reward-model stage will do with every kept row
                    for name in images + (("source_image",) if row["task"] == "edit" else ()):
                        decode_png(row[name])
            _assert_nothing_written_outside(before, root, store)


# --------------------------------------------------------------------------- 4. reward server requests

RESOLUTION = 32
SERVER_MAX_BATCH = 4
EDIT_PROMPTS = ["remove the red square", "make the blue circle green"]


def battery_edit_composite():
    """The shapes edit composite as the stages build it, with an untrained tiny scorer (the server's reward)."""
    import torch

    from flowrl.rewards.composite import CompositeReward, shapes_category
    from flowrl.rewards.identity import ShapesIdentityScorer
    from flowrl.rewards.shapes_rewards import ScorerReward
    from flowrl.rewards.shapes_scorer import ScorerArch, ShapesScorer

    torch.manual_seed(0)
    scorer = ShapesScorer(ScorerArch(width=32, depth=1, heads=2), RESOLUTION).eval()
    return CompositeReward(
        components={"instruction": ScorerReward(scorer, "instruction"), "identity": ShapesIdentityScorer()},
        weights={}, categorize=shapes_category, default_weights={"instruction": 1.0, "identity": 1.0},
    )


@pytest.fixture(scope="module")
def reward_server(tmp_path_factory):
    from flowrl.rewards.server import free_port, launch_server

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    rewards = {"edit": f"{__name__}:battery_edit_composite", "t2i": "tests.rewards.fake_rewards:brightness"}
    server = launch_server(rewards,
                           port=free_port(), log_path=tmp_path_factory.mktemp("battery-server") / "server.log",
                           max_batch=SERVER_MAX_BATCH, image_size=(RESOLUTION, RESOLUTION), env=env, cwd=ROOT,
                           reward_kwargs={"t2i": {"prompt_weight": 0.0}})
    try:
        server.wait_until_healthy(timeout_s=120)
        yield server
    finally:
        server.stop()


def _wire(batch, height=RESOLUTION, width=RESOLUTION, channels=3, fill=0):
    """A uint8 batch of one colour; its base64 as a token (3 equal bytes are 4 equal characters)."""
    count = batch * height * width * channels
    data = base64.b64encode(bytes([fill]) * 3).decode()
    return {"shape": [batch, height, width, channels], "dtype": "uint8",
            "data": f"{{{data}*{count // 3}}}" + base64.b64encode(bytes([fill]) * (count % 3)).decode()}


sizes = st.one_of(st.integers(1, SERVER_MAX_BATCH),
                  st.sampled_from([0, -1, SERVER_MAX_BATCH + 1, 2**31, 2**63, 10**30]))


@st.composite
def image_payloads(draw, batch: int):
    """A wire batch: valid, or wrong in one or more of its parts."""
    form = draw(st.sampled_from(["valid"] * 4 + ["size", "shape", "dtype", "data", "junk", "extra", "missing"]))
    if form == "valid":
        return _wire(batch, fill=draw(st.integers(0, 255)))
    if form == "size":
        return _wire(batch, draw(st.sampled_from([1, 8, 31, 33, 64])), draw(st.sampled_from([1, 32, 33])))
    payload = _wire(max(batch, 1))
    if form == "shape":
        payload["shape"] = draw(st.one_of(st.lists(sizes, max_size=6), st.sampled_from([[batch, 32, 32, 4],
                                          [batch, 32, 32, 3.0], [batch, 32, 32, "3"], [2**40, 2**40, 2**40, 3]]), junk))
    elif form == "dtype":
        payload["dtype"] = draw(st.one_of(st.sampled_from(["float32", "uint16", "UINT8", "uint8 ", ""]), junk))
    elif form == "data":
        payload["data"] = big(payload["data"])
        payload["data"] = draw(st.one_of(st.sampled_from(["", "====", "!!!!", payload["data"][:-4] + "@@@@",
                                                          payload["data"] + "AAAA", payload["data"][:-4],
                                                          payload["data"].replace("A", "\u00c1", 1)]),
                                         st.text(alphabet="ABCD=+/-_ ", max_size=40), junk))
    elif form == "junk":
        return draw(junk)
    elif form == "extra":
        payload[draw(st.sampled_from(["scale", "../x", "", "{x*300}"]))] = draw(junk)
    else:
        payload.pop(draw(st.sampled_from(["shape", "dtype", "data"])))
    return payload


prompt = st.one_of(st.sampled_from(EDIT_PROMPTS + ["a red circle"]), st.sampled_from(
    ["", " ", "a\x00b", "\x07bell", "{x*10001}", "{remove the red square*400}", "\ud800", "😀", "make it pop"]),
    st.text(max_size=30), junk)


@st.composite
def score_requests(draw):
    """(reward name in the path, body form, body content, content type); the test encodes the body."""
    name = draw(st.sampled_from(["edit", "t2i"]) if draw(st.integers(0, 9)) else st.one_of(
        st.sampled_from(["nope", "..%2f..%2fhealth", "%00", "{x*300}"]), st.text(alphabet="abc%.", max_size=8)))
    batch = draw(st.integers(1, SERVER_MAX_BATCH))
    if draw(st.booleans()):  # a valid request for the reward, then at most one part replaced
        body = {"prompts": draw(st.lists(st.sampled_from(EDIT_PROMPTS), min_size=batch, max_size=batch)),
                "images": _wire(batch, fill=draw(st.integers(0, 255)))}
        if name == "edit":
            body["sources"] = _wire(batch, fill=draw(st.integers(0, 255)))
        part = draw(st.sampled_from([None, None, "prompts", "images", "sources"]))
        if part == "prompts":
            body["prompts"] = draw(st.one_of(st.lists(prompt, max_size=SERVER_MAX_BATCH + 2), junk))
        elif part is not None:
            body[part] = draw(st.one_of(image_payloads(batch), st.none()))
    else:
        body = {"prompts": draw(st.one_of(st.lists(st.sampled_from(EDIT_PROMPTS), min_size=batch, max_size=batch),
                                          st.lists(prompt, max_size=SERVER_MAX_BATCH + 2), junk)),
                "images": draw(image_payloads(batch)),
                "sources": draw(st.one_of(image_payloads(batch), st.none()))}
        for key in draw(st.lists(st.sampled_from(["prompts", "images", "sources"]), max_size=1)):
            body.pop(key)
        body.update(draw(st.dictionaries(st.sampled_from(["reward", "junk", "__proto__", "prompts "]), junk,
                                         max_size=1)))
    form = draw(st.sampled_from(["json"] * 10 + ["raw", "nested", "nan", "top-level", "utf16"]))
    content = {"raw": st.binary(max_size=200), "nested": st.sampled_from([17, 100, 1000, 100_000]),
               "top-level": junk}.get(form, st.just(body))
    content_type = draw(st.sampled_from(["application/json"] * 5 + ["text/plain", "", "application/json; charset=x"]))
    return name, form, draw(content), content_type


def _expand(value):
    if isinstance(value, str):
        return big(value)
    if isinstance(value, list):
        return [_expand(v) for v in value]
    if isinstance(value, dict):
        return {_expand(k): _expand(v) for k, v in value.items()}
    return value


def _encode(form: str, content) -> bytes:
    if form == "raw":
        return content
    if form == "nested":
        return b"[" * content + b"]" * content
    text = json.dumps(_expand(content))
    if form == "nan":
        text = text.replace('"prompts"', '"x": NaN, "prompts"', 1) if text.startswith("{") else "NaN"
    return text.encode("utf-16" if form == "utf16" else "utf-8")


def _post(server, name: str, body: bytes, content_type: str) -> tuple[int, bytes, str]:
    url = urllib.parse.urlsplit(server.base_url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=HANG_S)
    try:
        headers = {"Content-Type": content_type} if content_type else {}
        connection.request("POST", f"/score/{urllib.parse.quote(name, safe='%/.')}", body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read(), response.getheader("content-type", "")
    finally:
        connection.close()


@pytest.mark.bad_input
@battery("request")
@given(case=score_requests())
def test_generated_score_requests_get_a_2xx_or_a_json_4xx(tally, reward_server, case):
    name, form, content, content_type = case
    name, body = big(name), _encode(form, content)
    description = f"POST /score/{name[:100]} ({content_type}) {body[:1500]!r}"
    with tally.case(description, reward_server.process.pid):
        status, raw, response_type = _post(reward_server, name, body, content_type)
        event(f"status {status}")
        assert status < 500, f"{status}: {raw[:500]!r}"
        assert 200 <= status < 300 or 400 <= status < 500, f"status {status}"
        assert "application/json" in response_type, f"{status} answered as {response_type!r}: {raw[:200]!r}"
        answer = json.loads(raw)
        if status >= 400:
            assert isinstance(answer, dict) and isinstance(answer.get("detail"), str) and answer["detail"]
            assert len(answer["detail"]) <= MAX_MESSAGE_CHARS
        else:
            sent = json.loads(body)
            batch = len(sent["prompts"])
            assert isinstance(answer["scores"], list) and len(answer["scores"]) == batch
            assert all(isinstance(v, float) and math.isfinite(v) for v in answer["scores"])
            for values in answer["components"].values():
                assert len(values) == batch and all(math.isfinite(v) for v in values)
    assert reward_server.process.poll() is None, "the reward server died"
