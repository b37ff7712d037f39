"""Checkpoint metadata read from artifacts is untrusted: model.json of a base artifact, and an RL
checkpoint's state.json, trainer.pt and sharded.json are checked against their schema, and anything
else is one clear error naming the file and the field, before a model is built or a tensor allocated."""

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from flowrl.config import FlowRLConfig, ShapesModelConfig, from_dict
from flowrl.models import CheckpointError, create_model, load_checkpoint, save_checkpoint
from flowrl.models import shapes_dit
from flowrl.models.shapes_dit import ShapesDiT, shapes_parameter_count
from flowrl.rl.shards import SHARDED, ShardError, read_layout
from flowrl.rl.trainer import Checkpoints, TrainerState
from flowrl.storage import ArtifactStore

TINY = {"model": {"shapes": {"width": 32, "depth": 2, "heads": 2, "head_channels": 4}}}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("base")
    save_checkpoint(create_model(from_dict(FlowRLConfig, TINY), seed=0), directory)
    return directory


@pytest.fixture
def no_model_built(monkeypatch):
    """Fails the test if the network is constructed (the contract: refuse before allocating)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was built from metadata that should have been refused")

    monkeypatch.setattr(shapes_dit, "ShapesDiT", refuse)


def _meta(tiny_checkpoint: Path) -> dict:
    return json.loads((tiny_checkpoint / "model.json").read_text())


def _with_meta(tiny_checkpoint: Path, tmp_path: Path, meta) -> Path:
    shutil.copy(tiny_checkpoint / "model.safetensors", tmp_path / "model.safetensors")
    text = meta if isinstance(meta, (str, bytes)) else json.dumps(meta)
    (tmp_path / "model.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    return tmp_path


def _edit(path: str, value):
    """A model.json edit: set (or, for ``...``, delete) the dotted key ``path``."""
    def apply(meta: dict) -> dict:
        *parents, last = path.split(".")
        node = meta
        for key in parents:
            node = node[key]
        if value is ...:
            del node[last]
        else:
            node[last] = value
        return meta
    return apply


MODEL_JSON_CASES = {
    "a list": (lambda meta: [], "expected a JSON object, got list"),
    "not JSON": (lambda meta: "{family: shapes", "unreadable checkpoint metadata"),
    "invalid UTF-8": (lambda meta: b"\xff\xfe{}", "unreadable checkpoint metadata"),
    "deeply nested": (lambda meta: "[" * 30_000 + "]" * 30_000, "unreadable checkpoint metadata"),
    "too large": (lambda meta: " " * 100_000 + json.dumps(meta), "more than a checkpoint's metadata may hold"),
    "no resolution": (_edit("resolution", ...), "resolution: required key missing"),
    "no family": (_edit("family", ...), "family: required key missing"),
    "no shapes": (_edit("shapes", ...), "shapes: required key missing"),
    "resolution 1e7": (_edit("resolution", 1e7), "resolution: expected an integer in 1..256, got 10000000.0"),
    "resolution 10**7": (_edit("resolution", 10**7), "resolution: expected an integer in 1..256, got 10000000"),
    "resolution 2**70": (_edit("resolution", 2**70), "resolution: expected an integer in 1..256"),
    "resolution text": (_edit("resolution", "32"), "resolution: expected an integer in 1..256, got '32'"),
    "resolution true": (_edit("resolution", True), "resolution: expected an integer in 1..256, got True"),
    "resolution 0": (_edit("resolution", 0), "resolution: expected an integer in 1..256, got 0"),
    "family a list": (_edit("family", ["shapes"]), "family: expected one of"),
    "family unknown": (_edit("family", "sd3"), "family: expected one of"),
    "shapes a list": (_edit("shapes", [1, 2]), "shapes: expected a mapping"),
    "width huge": (_edit("shapes.width", 1 << 20), ("shapes.width: expected int", "more than the 1073741824")),
    "width negative": (_edit("shapes.width", -8), "shapes.width"),
    "depth huge": (_edit("shapes.depth", 10_000), ("shapes.depth: expected int", "more than the 1073741824")),
    "patch huge": (_edit("shapes.patch", 4096), "shapes.patch: 4096 does not divide resolution 32"),
    "patch not dividing": (_edit("shapes.patch", 5), "shapes.patch: 5 does not divide resolution 32"),
    "heads not dividing": (_edit("shapes.heads", 3), "shapes.heads: 3 must divide shapes.width 32"),
    "head_channels huge": (_edit("shapes.head_channels", 1 << 16),
                           ("shapes.head_channels: expected int", "more than the 1073741824")),
    "within the config's bounds, too many parameters": (
        lambda meta: {**meta, "shapes": {**meta["shapes"], "width": 4096, "heads": 32, "depth": 200}},
        "parameters, more than the 1073741824 a shapes checkpoint may have"),
    "unknown shapes key": (_edit("shapes.layers", 4), "shapes.layers: unknown key"),
    "unknown top key": (_edit("pickle", "x"), "pickle: unknown key"),
    "prediction bad": (_edit("shapes.prediction", "eps"), "shapes.prediction: expected one of"),
}


@pytest.mark.bad_input
@pytest.mark.parametrize("case", sorted(MODEL_JSON_CASES))
def test_model_json_is_validated_before_the_model_is_built(tiny_checkpoint, tmp_path, no_model_built, case):
    edit, message = MODEL_JSON_CASES[case]
    directory = _with_meta(tiny_checkpoint, tmp_path, edit(_meta(tiny_checkpoint)))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(directory, expected_family="shapes")
    text = str(err.value)
    messages = message if isinstance(message, tuple) else (message,)  # the config's bounds or the parameter cap
    assert str(directory / "model.json") in text and any(m in text for m in messages), text
    assert "\n" not in text and len(text) < 600


@pytest.mark.bad_input
def test_model_json_larger_than_its_weights_is_refused_before_allocating(tiny_checkpoint, tmp_path, no_model_built):
    """Within every maximum, but the weights file cannot hold the model it describes."""
    meta = _meta(tiny_checkpoint)
    meta["shapes"].update(width=1024, depth=48, heads=16)
    directory = _with_meta(tiny_checkpoint, tmp_path, meta)
    with pytest.raises(CheckpointError, match="weights do not fit the model: model.json describes") as err:
        load_checkpoint(directory)
    assert str(directory / "model.safetensors") in str(err.value)


@pytest.mark.bad_input
def test_pickle_in_place_of_the_weights_is_refused(tiny_checkpoint, tmp_path):
    directory = _with_meta(tiny_checkpoint, tmp_path, _meta(tiny_checkpoint))
    (directory / "model.safetensors").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(CheckpointError, match="unreadable safetensors file") as err:
        load_checkpoint(directory)
    assert str(directory / "model.safetensors") in str(err.value)


def test_valid_checkpoint_still_loads(tiny_checkpoint):
    model = load_checkpoint(tiny_checkpoint, expected_family="shapes")
    assert model.net.resolution == 32 and model.net.config.width == 32


@pytest.mark.parametrize("kwargs,resolution", [({}, 32), ({"patch": 4, "depth": 1}, 64),
                                               ({"width": 48, "heads": 3, "head_channels": 2}, 32)])
def test_parameter_count_without_building_matches_the_network(kwargs, resolution):
    config = ShapesModelConfig(**kwargs)
    built = sum(p.numel() for p in ShapesDiT(config, resolution).parameters())
    assert shapes_parameter_count(config, resolution) == built


# --------------------------------------------------------------------------- RL checkpoints


class _Runs:
    """A real checkpoint of a tiny module, and a way to commit a tampered copy of it under a run's name."""

    def __init__(self, root: Path):
        self.store = ArtifactStore(str(root))
        self.net = torch.nn.Linear(3, 2)
        self.opt = torch.optim.AdamW(self.net.parameters())
        self.net(torch.ones(1, 3)).sum().backward()
        self.opt.step()
        self.good = Checkpoints(self.store, "grpo_t2i", "good").save(
            TrainerState(iteration=3, history=[{"loss": 0.5}] * 3, monitor=[{"iteration": 0, "train_reward": None,
                                                                             "heldout": 0.4}]),
            self.net, self.opt, None, "h")
        self.root = root

    def tampered(self, name: str, change) -> tuple[Checkpoints, str]:
        """Commit a copy of the good checkpoint, ``change(directory)`` applied, as run ``name``'s iteration 3."""
        staging = self.root / f"staging-{name}"
        shutil.copytree(self.good, staging, ignore=shutil.ignore_patterns("manifest.json"))
        change(staging)
        uri = self.store.commit(staging, stage="grpo_t2i.checkpoints", version=f"{name}-0000003",
                                config_hash="h", inputs={"run": name})
        return Checkpoints(self.store, "grpo_t2i", name), uri

    def load(self, ckpts: Checkpoints, uri: str):
        return ckpts.load(uri, self.net, self.opt, None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return _Runs(tmp_path_factory.mktemp("rl"))


class _RunsCode:
    """What a planted pickle would run: it leaves a file behind."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.bad_input
def test_planted_pickle_in_trainer_state_is_one_line_naming_the_file(runs, tmp_path):
    marker = tmp_path / "pwned"

    def plant(directory: Path):
        torch.save({"optimizer": _RunsCode(str(marker)), "torch_rng": torch.get_rng_state()}, directory / "trainer.pt")

    ckpts, uri = runs.tampered("planted", plant)
    with pytest.raises(CheckpointError) as err:
        runs.load(ckpts, uri)
    text = str(err.value)
    assert text.startswith(str(Path(uri) / "trainer.pt")) and "refused" in text and "\n" not in text
    assert "weights_only` set to `False`" not in text  # no advice to load it unsafely
    assert not marker.exists()


def _write_state(change):
    def apply(directory: Path):
        state = json.loads((directory / "state.json").read_text())
        state = change(state)
        (directory / "state.json").write_text(state if isinstance(state, str) else json.dumps(state))
    return apply


def _set(key, value):
    def change(state):
        if value is ...:
            del state[key]
        else:
            state[key] = value
        return state
    return change


STATE_CASES = {
    "a list": (lambda s: [], "expected a JSON object, got list"),
    "not JSON": (lambda s: "{iteration: 3", "unreadable checkpoint state"),
    "no iteration": (_set("iteration", ...), "iteration: required key missing"),
    "no history": (_set("history", ...), "history: required key missing"),
    "iteration text": (_set("iteration", "3"), "iteration: expected an integer in 0..9999999, got 3"),
    "iteration float": (_set("iteration", 3.0), "iteration: expected an integer in 0..9999999, got 3.0"),
    "iteration bool": (_set("iteration", True), "iteration: expected an integer"),
    "iteration huge": (_set("iteration", 10**15), "iteration: expected an integer in 0..9999999"),
    "iteration negative": (_set("iteration", -1), "iteration: expected an integer in 0..9999999, got -1"),
    "iteration not the name's": (_set("iteration", 7), "iteration: 7, but the checkpoint is named for iteration 3"),
    "history a dict": (_set("history", {"loss": 1}), "history: expected a list, got dict"),
    "history of text": (_set("history", [{"loss": "low"}]), "history[0]: expected {metric: number}"),
    "monitor entry a list": (_set("monitor", [[1, 2]]), "monitor[0]: expected"),
    "monitor without reward": (_set("monitor", [{"iteration": 0}]), "monitor[0]: expected"),
    "stopped a number": (_set("stopped", 5), "stopped: expected text or null, got 5"),
    "unknown key": (_set("exec", "rm -rf"), "exec: unknown key"),
}


@pytest.mark.bad_input
@pytest.mark.parametrize("case", sorted(STATE_CASES))
def test_checkpoint_state_is_validated(runs, case):
    change, message = STATE_CASES[case]
    name = "state-" + case.replace(" ", "-").replace("'", "")
    ckpts, uri = runs.tampered(name, _write_state(change))
    with pytest.raises(CheckpointError) as err:
        runs.load(ckpts, uri)
    text = str(err.value)
    assert text.startswith(str(Path(uri) / "state.json")) and message in text, text


TRAINER_FILE_CASES = {
    "rng a list": ({"torch_rng": [1, 2, 3]}, "torch_rng: expected a uint8 tensor of shape (5056,)"),
    "rng of floats": ({"torch_rng": torch.zeros(5056)}, "torch_rng: expected a uint8 tensor"),
    "rng too short": ({"torch_rng": torch.zeros(8, dtype=torch.uint8)}, "torch_rng: expected a uint8 tensor"),
    "no rng": ({"torch_rng": ...}, "torch_rng: required key missing"),
    "no optimizer": ({"optimizer": ...}, "optimizer: required key missing"),
    "optimizer a list": ({"optimizer": [1]}, "optimizer: expected a torch optimizer state dict"),
}


@pytest.mark.bad_input
@pytest.mark.parametrize("case", sorted(TRAINER_FILE_CASES))
def test_checkpoint_trainer_file_is_validated(runs, case):
    changes, message = TRAINER_FILE_CASES[case]

    def change(directory: Path):
        data = torch.load(directory / "trainer.pt", weights_only=True)
        for key, value in changes.items():
            if value is ...:
                del data[key]
            else:
                data[key] = value
        torch.save(data, directory / "trainer.pt")

    ckpts, uri = runs.tampered("trainer-" + case.replace(" ", "-"), change)
    before = torch.get_rng_state()
    with pytest.raises(CheckpointError) as err:
        runs.load(ckpts, uri)
    assert str(err.value).startswith(str(Path(uri) / "trainer.pt")) and message in str(err.value), str(err.value)
    assert torch.equal(torch.get_rng_state(), before)  # nothing of it was applied


@pytest.mark.bad_input
def test_planted_pickle_in_place_of_checkpoint_weights(runs):
    ckpts, uri = runs.tampered("weights-pickle", lambda d: (d / "model.safetensors").write_bytes(pickle.dumps([1])))
    with pytest.raises(CheckpointError, match="unreadable safetensors file") as err:
        runs.load(ckpts, uri)
    assert str(Path(uri) / "model.safetensors") in str(err.value)


def test_untampered_checkpoint_loads(runs):
    state = runs.load(Checkpoints(runs.store, "grpo_t2i", "good"), runs.good)
    assert state.iteration == 3 and state.history == [{"loss": 0.5}] * 3 and state.monitor[0]["heldout"] == 0.4


LAYOUT = {"format": 1, "world": 2, "zero_stage": 2, "ema": False, "buffers": [], "state_keys": ["w"],
          "params": [{"name": "w", "shape": [4, 3], "dtype": "float32", "trained": True}]}

LAYOUT_CASES = {
    "a list": ([], "expected a JSON object, got list"),
    "world text": ({"world": "2"}, "world: expected an integer in 0..65536"),
    "world huge": ({"world": 10**9}, "world: expected an integer in 0..65536"),
    "world zero": ({"world": 0}, "world: expected at least 1 rank"),
    "zero stage 7": ({"zero_stage": 7}, "zero_stage: expected 1, 2 or 3, got 7"),
    "ema text": ({"ema": "yes"}, "ema: expected true or false"),
    "params a dict": ({"params": {"w": 1}}, "params: expected a list, got dict"),
    "shape of text": ({"params": [{"name": "w", "shape": ["4"], "dtype": "float32", "trained": True}]},
                      "params[0]: expected"),
    "shape huge": ({"params": [{"name": "w", "shape": [1 << 30, 1 << 30], "dtype": "float32", "trained": True}]},
                   "params[0] (w): shape [1073741824, 1073741824] has more than"),
    "dtype unknown": ({"params": [{"name": "w", "shape": [4], "dtype": "pickle", "trained": True}]},
                      "unknown dtype 'pickle'"),
    "buffers of numbers": ({"buffers": [1]}, "buffers: expected a list of names"),
}


@pytest.mark.bad_input
@pytest.mark.parametrize("case", sorted(LAYOUT_CASES))
def test_sharded_layout_is_validated(tmp_path, case):
    change, message = LAYOUT_CASES[case]
    layout = change if isinstance(change, list) else {**LAYOUT, **change}
    (tmp_path / SHARDED).write_text(json.dumps(layout))
    with pytest.raises(ShardError) as err:
        read_layout(tmp_path)
    assert str(err.value).startswith(str(tmp_path / SHARDED)) and message in str(err.value), str(err.value)


def test_valid_layout_reads(tmp_path):
    (tmp_path / SHARDED).write_text(json.dumps(LAYOUT))
    assert read_layout(tmp_path) == LAYOUT
