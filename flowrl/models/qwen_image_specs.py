"""Component config files of the production weights, without the network.

Planning, packaging and schedules need only each component's config file
(``transformer/config.json``, ``scheduler/scheduler_config.json``, ...), not
the weights. :func:`component_configs` reads them, in this order:

1. a local directory: a diffusers-layout pipeline (one subfolder per
   component) or a transformers model (``config.json`` at its root);
2. a known hub id: the published config files shipped in ``specs/`` (one
   JSON file per repository, named ``Org--Name.json``, recording the hub
   revision it was written from);
3. any other hub id already in the local Hugging Face cache.

Nothing here opens a network connection; anything else is an error that
names the config key and the known ids.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

from flowrl.config import ConfigError

SPECS_DIR = Path(__file__).with_name("specs")
_CONFIG_FILES = ("config.json", "scheduler_config.json")  # a model's, a scheduler's
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _spec_file(repo_id: str) -> Path:
    return SPECS_DIR / (repo_id.replace("/", "--") + ".json")


def known_ids() -> list[str]:
    """Hub ids whose published configs ship with flowrl."""
    return sorted(json.loads(p.read_text())["repo_id"] for p in SPECS_DIR.glob("*.json"))


@cache
def shipped_spec(repo_id: str) -> dict[str, Any]:
    """The whole shipped spec of a known hub id (``repo_id``, ``revision``,
    ``layout``, ``components``); KeyError for an unknown id."""
    path = _spec_file(repo_id)
    if not path.is_file():
        raise KeyError(repo_id)
    spec = json.loads(path.read_text())
    if spec.get("repo_id") != repo_id:
        raise ConfigError(f"{path}: holds the spec of {spec.get('repo_id')!r}, not {repo_id!r}")
    return spec


def _read_json(path: Path, key: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{key}: {path} is not valid JSON: {exc}") from None


def _local_configs(root: Path, key: str) -> dict[str, dict[str, Any]]:
    """Component name -> config of a local directory: each subfolder holding a
    config file (diffusers layout), or ``model`` for a root ``config.json``."""
    out = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for name in _CONFIG_FILES:
            if (folder / name).is_file():
                out[folder.name] = _read_json(folder / name, key)
                break
    if (root / "config.json").is_file():
        out["model"] = _read_json(root / "config.json", key)
    return out


def _cached_configs(repo_id: str, key: str) -> dict[str, dict[str, Any]]:
    """The configs of a hub repo from the local Hugging Face cache alone (its
    ``main`` snapshot); empty when the repo is not cached."""
    from huggingface_hub import try_to_load_from_cache

    def cached(filename: str) -> Path | None:
        found = try_to_load_from_cache(repo_id, filename)
        return Path(found) if isinstance(found, str) else None

    index = cached("model_index.json")
    if index is None:
        root_config = cached("config.json")
        return {"model": _read_json(root_config, key)} if root_config else {}
    out = {}
    for name, value in _read_json(index, key).items():
        if name.startswith("_") or not isinstance(value, list):
            continue
        for filename in _CONFIG_FILES:
            path = cached(f"{name}/{filename}")
            if path is not None:
                out[name] = _read_json(path, key)
                break
    return out


def component_configs(pretrained: str, key: str = "model.qwen_image.pretrained",
                      required: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """Component name -> its config dict (``transformer``, ``vae``,
    ``text_encoder``, ``scheduler``, ...; ``model`` for a transformers
    model) of a local directory, a known hub id, or a cached hub repo.

    FileNotFoundError names ``key`` (the config key that holds
    ``pretrained``) and the known ids when none of them has it, or the
    first of the ``required`` components it lacks; no network.
    """
    configs = _find_configs(pretrained, key)
    missing = [name for name in required if name not in configs]
    if missing:
        raise FileNotFoundError(f"{key}: cannot read the component configs of {pretrained!r}: no {missing[0]!r} "
                                f"config among {sorted(configs)}")
    return configs


def _find_configs(pretrained: str, key: str) -> dict[str, dict[str, Any]]:
    local = Path(pretrained).expanduser()
    if local.is_dir():
        configs = _local_configs(local, key)
        if not configs:
            raise FileNotFoundError(f"{key}: cannot read the component configs of {pretrained!r}: the directory "
                                    "holds no component config (diffusers layout: <component>/config.json)")
        return configs
    try:
        return json.loads(json.dumps(shipped_spec(pretrained)["components"]))  # a copy the caller may change
    except KeyError:
        pass
    configs = _cached_configs(pretrained, key) if _HUB_ID.match(pretrained) else {}
    if configs:
        return configs
    raise FileNotFoundError(
        f"{key}: cannot read the component configs of {pretrained!r}: it is not a local directory, not in the "
        f"local Hugging Face cache, and not one of the hub ids whose configs ship with flowrl "
        f"({', '.join(known_ids())}); nothing is downloaded here")
