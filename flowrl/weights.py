"""Pretrained weights, fetched from the model hub once per revision.

On a cluster every stage runs in its own pod, and each would otherwise download Qwen-Image and
Qwen-Image-Edit (100+ GB) from the hub into its container disk, again on every retry. Instead the
base stage mirrors each hub repository into the artifact store (stage ``weights``, one version per
repository and commit: write-once, complete or invisible like every artifact) and records the
mirror's URI; later stages and retries read the mirror from the store, copied once per machine
into a local cache (:func:`local_weights`). A local directory is used in place, as before.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from flowrl.storage import ArtifactError, ArtifactStore, read_manifest

log = logging.getLogger(__name__)

STAGE = "weights"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_CACHE_ENV = "FLOWRL_WEIGHTS_CACHE"
_COMPLETE = ".complete"  # a marker beside a local copy of a mirror, written once the copy is whole


def is_hub_id(source: str) -> bool:
    """``org/name`` that is not a path on this machine."""
    return bool(_HUB_ID.match(source)) and not Path(source).expanduser().exists()


def is_store_uri(source: str) -> bool:
    return "://" in source and not source.startswith("file://")


def hub_commit(repo_id: str, revision: str | None, key: str) -> str:
    """The commit hash a hub revision (branch, tag or hash; None: main) points at now."""
    if revision is not None and _COMMIT.match(revision):
        return revision
    from huggingface_hub import HfApi

    try:
        sha = HfApi().model_info(repo_id, revision=revision).sha
    except Exception as exc:  # network, auth and not-found errors all end here
        raise FileNotFoundError(f"{key}: cannot resolve {repo_id!r} at revision {revision or 'main'!r} on the hub: "
                                f"{exc}") from None
    if not sha or not _COMMIT.match(sha):
        raise FileNotFoundError(f"{key}: the hub gave no commit hash for {repo_id!r} at {revision or 'main'!r}")
    return sha


def mirror_version(repo_id: str, commit: str) -> str:
    """The ``weights`` artifact version of one repository at one commit."""
    return f"{repo_id.replace('/', '--')}--{commit}"


def mirror(repo_id: str, store: ArtifactStore, key: str, revision: str | None = None) -> str:
    """The store URI of ``repo_id`` at ``revision``: the existing mirror of that commit, or a new one
    downloaded from the hub now (the only download of that commit, whatever stage or retry asks)."""
    commit = hub_commit(repo_id, revision, key)
    version = mirror_version(repo_id, commit)
    if store.exists(STAGE, version):
        log.info("%s: %s@%s is mirrored at %s", key, repo_id, commit[:12], store.uri(STAGE, version))
        return store.uri(STAGE, version)
    from huggingface_hub import snapshot_download

    with tempfile.TemporaryDirectory(prefix="flowrl-weights-") as tmp:
        try:
            snapshot_download(repo_id=repo_id, revision=commit, local_dir=tmp)
        except Exception as exc:
            raise FileNotFoundError(f"{key}: downloading {repo_id!r}@{commit} from the hub failed: {exc}") from None
        shutil.rmtree(Path(tmp) / ".cache", ignore_errors=True)  # the hub client's download bookkeeping
        uri = store.commit(tmp, stage=STAGE, version=version, config_hash=commit[:16],
                           inputs={"hub": f"{repo_id}@{commit}"}, extra={"repo_id": repo_id, "commit": commit})
    log.info("%s: mirrored %s@%s to %s", key, repo_id, commit[:12], uri)
    return uri


def cache_dir() -> Path:
    """Where mirrors are copied on this machine (``FLOWRL_WEIGHTS_CACHE``, default ~/.cache/flowrl/weights)."""
    return Path(os.environ.get(_CACHE_ENV) or Path.home() / ".cache" / "flowrl" / "weights")


def local_weights(source: str, key: str) -> str:
    """A local directory holding ``source``: a directory as is; a mirror in the artifact store copied
    once into :func:`cache_dir` (checksums verified on the first copy); a hub id through the hub's own
    cache (the CLI on a workstation). FileNotFoundError names ``key`` when none works."""
    if is_store_uri(source):
        return str(_cached_copy(source, key))
    local = Path(source.removeprefix("file://")).expanduser()
    if local.exists():
        return str(local.resolve())
    if not _HUB_ID.match(source):
        raise FileNotFoundError(f"{key}: {source} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id=source)
    except Exception as exc:
        raise FileNotFoundError(
            f"{key}: {source!r} is not a local directory and downloading it from the hub failed: {exc}") from None


def _cached_copy(uri: str, key: str) -> Path:
    try:
        manifest = read_manifest(uri)
    except ArtifactError as exc:
        raise FileNotFoundError(f"{key}: {exc}") from None
    if manifest.stage != STAGE:
        raise FileNotFoundError(f"{key}: {uri} is an artifact of stage {manifest.stage}, not a weights mirror")
    target = cache_dir() / manifest.version
    marker = target.with_name(target.name + _COMPLETE)  # beside the copy: its files stay the mirror's own
    if marker.is_file() and target.is_dir():
        return target
    from flowrl.storage import fetch

    partial = Path(tempfile.mkdtemp(prefix=f".{manifest.version}.", dir=_mkdir(cache_dir())))
    try:
        fetch(uri, partial, verify=True)
        if target.exists() and not marker.is_file():  # the leftover of a copy interrupted before its marker
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(partial, target)
        except OSError:
            if not marker.is_file():  # not another process's complete copy: a real failure
                raise
        marker.write_text(uri)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
