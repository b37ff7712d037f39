"""Write-once, versioned artifact store over fsspec.

Every stage output lives under ``<root>/<stage>/<version>/``. A stage writes
its files into a local staging directory, then :meth:`ArtifactStore.commit`
uploads them and writes ``manifest.json`` *last*: a version without a valid
manifest is incomplete and never read. Versions are content-derived (stage,
config hash, code version, input versions), so the same inputs give the same
URI: reruns find the finished version instead of redoing it, and a cache
keyed on the URI (Flyte's) stays stable.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import fsspec

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
_CODE_ROOT = Path(__file__).resolve().parent


class ArtifactError(RuntimeError):
    """An artifact is missing, incomplete or corrupted; the message names it."""


@dataclass(frozen=True)
class Manifest:
    """What a version holds and where it came from (written last)."""

    stage: str
    version: str
    config_hash: str
    code_version: str
    inputs: dict[str, str]  # input name -> artifact URI
    files: dict[str, dict[str, object]]  # relative path -> {"sha256", "bytes"}
    created_unix: float
    format: int = MANIFEST_FORMAT
    extra: dict[str, str] = field(default_factory=dict)


# Modules left out of a stage's code version: they read the config, move
# bytes or log, and what they do to a stage's output reaches it only through
# the config values (hashed separately) or not at all. A change to them that
# does alter outputs must come with a config change.
CODE_VERSION_EXCLUDED = frozenset({"flowrl.config", "flowrl.storage", "flowrl.tracking", "flowrl.cli"})


def _module_file(name: str) -> Path | None:
    parts = name.split(".")[1:]
    base = _CODE_ROOT.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if parts and candidate.is_file():
            return candidate
    return _CODE_ROOT / "__init__.py" if not parts else None


def _imported_modules(name: str) -> set[str]:
    """The flowrl modules ``name``'s source imports (anywhere in the file),
    plus the packages Python runs on the way to it."""
    path = _module_file(name)
    tree = ast.parse(path.read_text(), filename=str(path))
    found = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "flowrl")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "flowrl":
            found.add(node.module)
            # `from flowrl.shapes import judge` imports a submodule when one exists
            found.update(f"{node.module}.{a.name}" for a in node.names if _module_file(f"{node.module}.{a.name}"))
    return {m for m in found if _module_file(m) is not None}


def module_closure(name: str) -> list[str]:
    """``name`` and every flowrl module it imports, transitively (sorted),
    less :data:`CODE_VERSION_EXCLUDED`."""
    if _module_file(name) is None:
        raise ValueError(f"no flowrl module named {name!r}")
    seen, todo = set(), [name]
    while todo:
        module = todo.pop()
        if module in seen or module in CODE_VERSION_EXCLUDED:
            continue
        seen.add(module)
        todo.extend(_imported_modules(module) - seen)
    return sorted(seen)


def code_version(module: str | None = None) -> str:
    """Hash of the library's source: changes whenever flowrl's code does.

    With ``module`` (e.g. ``flowrl.stages.grpo``), only the code that module
    runs counts (:func:`module_closure`): a change to the bench does not
    invalidate the trained teachers. Computed from the files themselves (not
    git) so it is the same inside a container image as in the checkout.
    """
    paths = (
        sorted(_CODE_ROOT.rglob("*.py")) if module is None else [_module_file(m) for m in module_closure(module)]
    )
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path.relative_to(_CODE_ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def artifact_version(stage: str, config_hash: str, code: str, inputs: dict[str, str]) -> str:
    blob = json.dumps([stage, config_hash, code, sorted(inputs.items())])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts))


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "file" in protocols


def _fs_and_path(uri: str, fs: fsspec.AbstractFileSystem | None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem to use for ``uri`` (``fs`` when given, so a store's
    storage options apply) and the path inside it."""
    url_fs, path = fsspec.core.url_to_fs(uri)
    return (fs or url_fs), path


def read_manifest(uri: str, fs: fsspec.AbstractFileSystem | None = None) -> Manifest:
    """The manifest of the complete artifact at ``uri`` (any fsspec URI)."""
    fs, root = _fs_and_path(uri, fs)
    path = _join(root, MANIFEST)
    if not fs.exists(path):
        raise ArtifactError(f"{uri}: no {MANIFEST}: the artifact does not exist or is incomplete")
    try:
        data = json.loads(fs.cat_file(path))
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        if data.get("format") != MANIFEST_FORMAT:
            raise ArtifactError(
                f"{uri}/{MANIFEST}: manifest format {data.get('format')!r}, expected {MANIFEST_FORMAT}"
            )
        return Manifest(**data)
    except (ValueError, TypeError) as exc:
        raise ArtifactError(f"{uri}/{MANIFEST}: unreadable manifest: {exc}") from None



class ArtifactStore:
    """Stage outputs under ``root`` (a local path or any fsspec URI)."""

    def __init__(self, root: str, storage_options: dict | None = None):
        if "://" not in root:
            root = str(Path(root).resolve())
        self.root = root
        self.fs, self._root_path = fsspec.core.url_to_fs(root, **(storage_options or {}))

    def uri(self, stage: str, version: str) -> str:
        for name, value in (("stage", stage), ("version", version)):
            if not value or "/" in value or value in (".", "..") or "\\" in value:
                raise ArtifactError(f"invalid artifact {name} {value!r}")
        return _join(self.root, stage, version)

    def _path(self, uri: str) -> str:
        return fsspec.core.url_to_fs(uri)[1] if "://" in uri else uri

    def read_manifest(self, uri: str) -> Manifest:
        """The manifest of a complete version, or ArtifactError naming the URI."""
        return read_manifest(uri, self.fs)

    def exists(self, stage: str, version: str) -> bool:
        try:
            self.read_manifest(self.uri(stage, version))
            return True
        except ArtifactError:
            return False

    def commit(
        self,
        staging_dir: str | Path,
        *,
        stage: str,
        version: str,
        config_hash: str,
        inputs: dict[str, str],
        extra: dict[str, str] | None = None,
        code: str | None = None,
    ) -> str:
        """Upload every file of ``staging_dir``, then the manifest; return the URI.

        ``code`` is the code version the version was derived from (default:
        the code as it is now).

        Write-once: if the version is already complete it is left untouched
        (same version = same inputs, config and code).
        """
        uri = self.uri(stage, version)
        if self.exists(stage, version):
            return uri
        staging_dir = Path(staging_dir)
        files = {}
        for path in sorted(p for p in staging_dir.rglob("*") if p.is_file()):
            rel = path.relative_to(staging_dir).as_posix()
            if rel == MANIFEST:
                raise ArtifactError(f"{staging_dir}: a stage may not write its own {MANIFEST}")
            files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
            target = _join(self._path(uri), rel)
            self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            self.fs.put_file(str(path), target)
        manifest = Manifest(
            stage=stage, version=version, config_hash=config_hash, code_version=code or code_version(),
            inputs=dict(inputs), files=files, created_unix=time.time(), extra=dict(extra or {}),
        )
        self._write_manifest(uri, manifest)
        return uri

    def _write_manifest(self, uri: str, manifest: Manifest) -> None:
        blob = json.dumps(asdict(manifest), indent=2, sort_keys=True).encode()
        final = _join(self._path(uri), MANIFEST)
        if _is_local(self.fs):
            # local: write a temp file next to it and rename, so the manifest appears atomically
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(final), prefix=".manifest-")
            with os.fdopen(fd, "wb") as fh:
                fh.write(blob)
            os.chmod(tmp, 0o644)  # mkstemp makes it private; the artifact's other files are not
            os.replace(tmp, final)
        else:
            # object stores: a single PUT is atomic
            self.fs.pipe_file(final, blob)

    def fetch(self, uri: str, local_dir: str | Path | None = None, verify: bool = True) -> Path:
        """A local directory holding the complete artifact at ``uri``, checksums verified."""
        return fetch(uri, local_dir, verify, self.fs)


def fetch(
    uri: str,
    local_dir: str | Path | None = None,
    verify: bool = True,
    fs: fsspec.AbstractFileSystem | None = None,
) -> Path:
    """A local directory holding the complete artifact at ``uri``, checksums verified.

    Local artifacts are read in place; remote ones are downloaded first.
    """
    manifest = read_manifest(uri, fs)
    fs, src = _fs_and_path(uri, fs)
    if local_dir is None and _is_local(fs):
        local = Path(src)
    else:
        local = Path(local_dir or tempfile.mkdtemp(prefix=f"flowrl-{manifest.stage}-"))
        for rel in manifest.files:
            (local / rel).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(_join(src, rel), str(local / rel))
    if verify:
        for rel, meta in manifest.files.items():
            path = local / rel
            if not path.is_file():
                raise ArtifactError(f"{uri}: file {rel} listed in the manifest is missing")
            if sha256_file(path) != meta["sha256"]:
                raise ArtifactError(f"{uri}: checksum mismatch for {rel}")
    return local


class StagingDir:
    """A temporary local directory a stage writes into before commit."""

    def __init__(self, stage: str):
        self.path = Path(tempfile.mkdtemp(prefix=f"flowrl-{stage}-stage-"))

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
