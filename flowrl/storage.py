"""Write-once, versioned artifact store over fsspec.

Every stage output lives under ``<root>/<stage>/<version>/``. A stage writes
its files into a local staging directory, then :meth:`ArtifactStore.commit`
uploads them and writes ``manifest.json`` *last*: a version without a valid
manifest is incomplete and never read. Versions are content-derived (stage,
config hash, code version, input versions), so the same inputs give the same
URI: reruns find the finished version instead of redoing it, and a cache
keyed on the URI (Flyte's) stays stable.

Publishing is safe against concurrent writers of one version and against a
store that goes away mid-upload:

- local filesystem: the whole version (files and manifest) is built under
  ``<root>/.partial/`` and renamed into place in one step; a writer that finds
  the version already published discards its copy.
- object stores: each writer uploads its files under a prefix of its own
  (``<version>/.payload-<token>/``, named by the manifest's ``payload``) and
  then creates the manifest only if it does not exist yet (S3 ``If-None-Match:
  *``), so the first manifest wins and nothing it names is ever overwritten;
  the loser deletes its payload and returns the winner's URI. Other object
  stores fall back to check-then-write (a narrow race, documented).
- every upload and the final check are retried with exponential backoff
  (0.5 s doubling, at most 8 s) for ``retry_s`` seconds (default 120, or
  ``FLOWRL_STORAGE_RETRY_S``); past that, :class:`ArtifactError` names the
  file, the cause and that nothing was published. A payload left by a failed
  upload is never named by a manifest, so no later run reads any of it.

A manifest is input like any other: every field of it that becomes a path
(stage, version, payload, each file name) must be a safe relative path
(:func:`unsafe_relpath`) or reading it fails, and wherever a local path is
built from one it is resolved and checked to stay inside its artifact, so a
crafted manifest can neither read nor write outside the artifact.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

import fsspec

from flowrl.config import clip_text, shown_value
from flowrl.redact import redact, redact_url

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
PARTIAL_DIR = ".partial"  # local stores: versions being built, under the root
_CODE_ROOT = Path(__file__).resolve().parent
_T = TypeVar("_T")


class ArtifactError(RuntimeError):
    """An artifact is missing, incomplete or corrupted; the message names it."""

    def __init__(self, *args: object) -> None:  # no credential of a URL in an error line (flowrl.redact)
        super().__init__(*(redact_url(a) if isinstance(a, str) else a for a in args))


# what a path inside an artifact may be: bounded in all and per segment (the usual filesystem limit)
MAX_RELPATH_CHARS = 1024
MAX_SEGMENT_CHARS = 255
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def unsafe_relpath(value: object, single: bool = False) -> str | None:
    """Why ``value`` is not a safe relative path inside an artifact, or None when it is.

    Safe: a non-empty string of at most :data:`MAX_RELPATH_CHARS` characters, of
    ``/``-separated segments that are neither empty, ``.`` nor ``..`` nor longer than
    :data:`MAX_SEGMENT_CHARS`, with no backslash, no NUL or other control character and no
    ``::`` (fsspec's URL chaining). Such a path joined under a directory stays under it
    (symbolic links aside, which the readers check by resolving). ``single``: one segment
    only (a stage or version name)."""
    if not isinstance(value, str):
        return f"expected a string, got {type(value).__name__}"
    if not value:
        return "empty"
    if len(value) > MAX_RELPATH_CHARS:
        return f"longer than {MAX_RELPATH_CHARS} characters"
    if _CONTROL_CHARS.search(value):
        return "a NUL or control character"
    if "\\" in value:
        return "a backslash"
    if value.startswith("/"):
        return "an absolute path"
    if "::" in value:
        return "'::' (a chained URL)"
    segments = value.split("/")
    if single and len(segments) > 1:
        return "a '/' (one name expected)"
    for segment in segments:
        if not segment:
            return "an empty path segment"
        if segment in (".", ".."):
            return f"a {segment!r} segment"
        if len(segment) > MAX_SEGMENT_CHARS:
            return f"a segment longer than {MAX_SEGMENT_CHARS} characters"
    return None


def _contained(root: str | Path, rel: str, uri: str, what: str) -> Path:
    """``root / rel``, having checked that it resolves (symbolic links followed) to a path
    inside ``root`` resolved; else ArtifactError naming ``uri`` and ``what``."""
    base = Path(root).resolve()
    target = (base / rel).resolve()
    if target != base and base not in target.parents:
        raise ArtifactError(f"{uri}: {what} {rel!r:.120} resolves to {target}, outside the artifact ({base})")
    return Path(root) / rel


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
    payload: str = ""  # subdirectory of the version holding ``files`` ("" = the version itself)


# Modules left out of a stage's code version: they read the config, move
# bytes, log or describe the host (flowrl.machine: what a record says about
# where it was made), and what they do to a stage's output reaches it only
# through the config values (hashed separately) or not at all. A change to
# them that does alter outputs must come with a config change.
CODE_VERSION_EXCLUDED = frozenset({"flowrl.config", "flowrl.storage", "flowrl.tracking", "flowrl.cli",
                                   "flowrl.machine", "flowrl.stages.registry"})


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


# the last two parts of an artifact's URI: ``<stage>/<version>``, or a run's checkpoint
# ``<stage>.checkpoints/<version>-<iteration>`` (versions are 16 hex digits, see artifact_version)
_ARTIFACT_TAIL = re.compile(r"(?:^|/)(?P<tail>[A-Za-z0-9_.-]+/[0-9a-f]{16}(?:-[0-9]+)?)/*$")


def input_identity(value: str) -> str:
    """What a version keys on for one input value: ``artifact:<stage>/<version>`` when the value is an
    artifact's URI, so that one artifact gives one downstream version however its URI is spelled
    (relative or absolute path, a trailing slash, a local copy of an S3 store); anything else (a task
    name, a file with its checksum) as given. Purely textual: whether the artifact exists is the
    stage's own check when it reads it."""
    match = _ARTIFACT_TAIL.search(value)
    return f"artifact:{match['tail']}" if match else value


def artifact_version(stage: str, config_hash: str, code: str, inputs: dict[str, str]) -> str:
    """The content-derived version of a stage output: a hash of the stage, its config sections' hash, its
    code version and its inputs, each input keyed by :func:`input_identity`."""
    keyed = sorted((name, input_identity(value)) for name, value in inputs.items())
    blob = json.dumps([stage, config_hash, code, keyed])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _manifest_bytes(manifest: Manifest) -> bytes:
    return json.dumps(asdict(manifest), indent=2, sort_keys=True).encode()


def _sha256_stream(handle) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: handle.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as fh:
        return _sha256_stream(fh)


def content_stamp(uri: str) -> str:
    """What a stage's cache key records of an input file a config names, so that new content at the
    same path misses the cache: a local file's SHA-256; an object's ETag (or checksum) from its
    store's listing, without reading it; "missing" when there is no such file (the stage's own
    checks name it)."""
    fs, path = url_to_fs(str(uri))
    try:
        if _is_local(fs):
            return "sha256:" + sha256_file(path)
        fs.invalidate_cache(path)  # a listing cached earlier in this process may predate the object
        info = fs.info(path)
        if info.get("type", "file") != "file":
            return "missing"
        for name in ("ETag", "etag", "md5", "checksum", "md5Hash", "crc32c"):
            if info.get(name):
                return f"{name}:{str(info[name]).strip(chr(34))}"
        with fs.open(path, "rb") as handle:
            return "sha256:" + _sha256_stream(handle)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return "missing"


def content_stamps(paths: dict[str, str | None]) -> dict[str, str]:
    """:func:`content_stamp` of each named path that is set (unset keys are left out)."""
    return {key: content_stamp(p) for key, p in paths.items() if p}


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts) if p or not i)


# errors that retrying cannot fix: the object store answered, and the answer is no
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


def _transient(exc: BaseException) -> bool:
    """A connection refused or reset, a timeout, a 5xx: worth retrying."""
    if isinstance(exc, _PERMANENT):
        return False
    if isinstance(exc, (OSError, TimeoutError)):
        return True
    return type(exc).__module__.split(".")[0] in {"botocore", "aiobotocore", "aiohttp", "urllib3", "requests"}


def _default_retry_s() -> float:
    raw = os.environ.get("FLOWRL_STORAGE_RETRY_S", "120")
    try:
        value = float(raw)
    except ValueError:
        raise ArtifactError(f"FLOWRL_STORAGE_RETRY_S={raw!r}: expected a number of seconds") from None
    if value < 0:
        raise ArtifactError(f"FLOWRL_STORAGE_RETRY_S={raw!r}: must be >= 0")
    return value


def with_retries(what: str, op: Callable[[], _T], budget_s: float, sleep: Callable[[float], None] = time.sleep) -> _T:
    """``op()``, retried on transient errors with exponential backoff until
    ``budget_s`` seconds have passed; then an ArtifactError naming ``what``."""
    start, delay, attempts = time.monotonic(), 0.5, 0
    while True:
        attempts += 1
        try:
            return op()
        except Exception as exc:
            if not _transient(exc):
                raise
            waited = time.monotonic() - start
            if waited + delay > budget_s:
                raise ArtifactError(
                    f"{what}: failed after {attempts} attempts over {waited:.0f} s "
                    f"(retry budget {budget_s:g} s): {type(exc).__name__}: {exc}"
                ) from exc
            sleep(delay)
            delay = min(delay * 2, 8.0)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "file" in protocols


def refuse_credentials(uri: str) -> None:
    """ArtifactError for a URI with credentials in it (``s3://KEY:SECRET@bucket``): an artifact's URI is
    printed, tagged and written into manifests, and s3fs would take them for the bucket's name."""
    if redact_url(uri) != uri:
        raise ArtifactError(f"{redact_url(uri)}: an artifact URI may not carry credentials (user:password@ or a "
                            "token in its query); give them through the environment (AWS_ACCESS_KEY_ID, "
                            "AWS_SECRET_ACCESS_KEY, ...) or the store's own configuration")


def url_to_fs(uri: str, **storage_options) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec's filesystem and path of ``uri``; an ArtifactError naming ``uri`` when its protocol is
    unknown or the package serving it is not installed (bad input, not a bug), or credentials in it."""
    refuse_credentials(uri)
    try:
        return fsspec.core.url_to_fs(uri, **storage_options)
    except (ValueError, ImportError) as exc:  # "Protocol not known: foo", "Install s3fs to access S3"
        raise ArtifactError(f"{uri}: {exc}") from None


def _fs_and_path(uri: str, fs: fsspec.AbstractFileSystem | None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem to use for ``uri`` (``fs`` when given, so a store's
    storage options apply) and the path inside it."""
    url_fs, path = url_to_fs(uri)
    return (fs or url_fs), path


STALE_CACHE_HINT = (
    "if a cached pipeline run handed this URI on after the artifact was deleted, rerun with "
    "`pyflyte run --overwrite-cache ...` or clear the local cache with `pyflyte local-cache clear`"
)


def require_published(artifacts: dict[str, str], fs: fsspec.AbstractFileSystem | None = None) -> None:
    """Every named artifact URI has its manifest (empty URIs, i.e. stages the
    config turned off, are skipped); else one ArtifactError naming them all.
    A pipeline ends with this check, so a cache hit that hands on a deleted
    artifact fails the run instead of reporting it as done."""
    missing = []
    for name, uri in artifacts.items():
        if not uri:
            continue
        try:
            read_manifest(uri, fs)
        except ArtifactError:
            missing.append(f"{name} ({uri})")
    if missing:
        raise ArtifactError(f"outputs of this run that do not exist or are incomplete: {', '.join(missing)}; "
                            f"{STALE_CACHE_HINT}")


def read_manifest(uri: str, fs: fsspec.AbstractFileSystem | None = None) -> Manifest:
    """The manifest of the complete artifact at ``uri`` (any fsspec URI)."""
    fs, root = _fs_and_path(uri, fs)
    path = _join(root, MANIFEST)
    fs.invalidate_cache(root)  # object stores cache listings: another writer may have published since
    if not fs.exists(path):
        raise ArtifactError(f"{uri}: no {MANIFEST}: the artifact does not exist or is incomplete ({STALE_CACHE_HINT})")
    try:
        data = json.loads(fs.cat_file(path))
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        if data.get("format") != MANIFEST_FORMAT:
            raise ArtifactError(
                f"{uri}/{MANIFEST}: manifest format {shown_value(data.get('format'))}, expected {MANIFEST_FORMAT}"
            )
        _check_manifest_fields(data)
        return Manifest(**data)
    except RecursionError:  # JSON nested past Python's recursion limit
        raise ArtifactError(f"{uri}/{MANIFEST}: unreadable manifest: nested too deeply") from None
    except (ValueError, TypeError) as exc:  # the reason may quote a field's value: cut short
        raise ArtifactError(f"{uri}/{MANIFEST}: unreadable manifest: {clip_text(str(exc), 500)}") from None


def _check_manifest_fields(data: dict) -> None:
    """ValueError naming the first field of a manifest that is missing or of the wrong type."""
    def is_str_map(value) -> bool:
        return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())

    def is_file_entry(value) -> bool:
        return (isinstance(value, dict) and isinstance(value.get("sha256"), str)
                and isinstance(value.get("bytes"), int) and not isinstance(value.get("bytes"), bool))

    checks = {
        "stage": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
        "version": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
        "config_hash": (lambda v: isinstance(v, str), "a string"),
        "code_version": (lambda v: isinstance(v, str), "a string"),
        "inputs": (is_str_map, "an object of input name -> URI"),
        "files": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and is_file_entry(e) for k, e in v.items()),
                  'an object of path -> {"sha256": str, "bytes": int}'),
        "created_unix": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    }
    optional = {"extra": (is_str_map, "an object of str -> str"), "payload": (lambda v: isinstance(v, str), "a string")}
    for name, (ok, expected) in checks.items():
        if name not in data:
            raise ValueError(f"field {name!r} is missing")
        if not ok(data[name]):
            raise ValueError(f"field {name!r}: expected {expected}, got {data[name]!r:.80}")
    for name, (ok, expected) in optional.items():
        if name in data and not ok(data[name]):
            raise ValueError(f"field {name!r}: expected {expected}, got {data[name]!r:.80}")
    # the fields that become paths: each one a safe relative path (stage and version one segment)
    for name in ("stage", "version"):
        why = unsafe_relpath(data[name], single=True)
        if why:
            raise ValueError(f"field {name!r}: {data[name]!r:.80} is not a safe name ({why})")
    if data.get("payload"):
        why = unsafe_relpath(data["payload"])
        if why:
            raise ValueError(f"field 'payload': {data['payload']!r:.80} is not a safe relative path ({why})")
    for rel in data["files"]:
        why = unsafe_relpath(rel)
        if why:
            raise ValueError(f"field 'files': file name {rel!r:.80} is not a safe relative path ({why})")


class ArtifactStore:
    """Stage outputs under ``root`` (a local path or any fsspec URI)."""

    def __init__(self, root: str, storage_options: dict | None = None, retry_s: float | None = None):
        if "://" not in root:
            root = str(Path(root).resolve())
        self.root = root
        self.fs, self._root_path = url_to_fs(root, **(storage_options or {}))
        self.retry_s = _default_retry_s() if retry_s is None else retry_s

    def uri(self, stage: str, version: str) -> str:
        for name, value in (("stage", stage), ("version", version)):
            why = unsafe_relpath(value, single=True)
            if why:
                raise ArtifactError(f"invalid artifact {name} {value!r:.80}: {why}")
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
        if with_retries(f"{uri}: checking for a published version", lambda: self._published(uri), self.retry_s):
            return uri
        staging_dir = Path(staging_dir)
        files = {}
        for path in sorted(p for p in staging_dir.rglob("*") if p.is_file()):
            rel = path.relative_to(staging_dir).as_posix()
            if rel == MANIFEST:
                raise ArtifactError(f"{staging_dir}: a stage may not write its own {MANIFEST}")
            why = unsafe_relpath(rel)
            if why:  # a manifest naming it could not be read back
                raise ArtifactError(f"{staging_dir}: file name {rel!r:.80} is not a safe relative path ({why})")
            files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        token = uuid.uuid4().hex[:16]
        local = _is_local(self.fs)
        manifest = Manifest(
            stage=stage, version=version, config_hash=config_hash, code_version=code or code_version(),
            inputs=redact(dict(inputs)), files=files, created_unix=time.time(), extra=redact(dict(extra or {})),
            payload="" if local else f".payload-{token}",
        )
        if local:
            self._publish_local(staging_dir, uri, manifest, token)
        else:
            self._publish_remote(staging_dir, uri, manifest)
        return uri

    def _published(self, uri: str) -> bool:
        self.fs.invalidate_cache(self._path(uri))
        return self.fs.exists(_join(self._path(uri), MANIFEST))

    def _publish_local(self, staging_dir: Path, uri: str, manifest: Manifest, token: str) -> None:
        """Build the version under <root>/.partial and rename it into place."""
        target = Path(self._path(uri))
        partial = Path(self._root_path) / PARTIAL_DIR / manifest.stage / f"{manifest.version}.{token}"
        try:
            for rel in manifest.files:
                (partial / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(staging_dir / rel, partial / rel)
            partial.mkdir(parents=True, exist_ok=True)
            self._write_manifest(str(partial), manifest)
            target.parent.mkdir(parents=True, exist_ok=True)
            for _ in range(3):
                try:
                    os.rename(partial, target)
                    return
                except OSError:
                    if (target / MANIFEST).is_file():
                        return  # another writer published this version first: same inputs, theirs stands
                    # a version directory without a manifest: the leftover of an interrupted non-atomic
                    # write; it was never complete, so it is removed and the rename tried again
                    shutil.rmtree(target, ignore_errors=True)
            raise ArtifactError(f"{uri}: could not publish (the directory keeps reappearing without a manifest)")
        finally:
            shutil.rmtree(partial, ignore_errors=True)

    def _publish_remote(self, staging_dir: Path, uri: str, manifest: Manifest) -> None:
        """Upload under a payload prefix of this writer, then create the manifest if absent."""
        root = _join(self._path(uri), manifest.payload)
        for rel in manifest.files:
            target = _join(root, rel)
            with_retries(f"{uri}: upload of {rel} (nothing published: no manifest)",
                         lambda: self.fs.put_file(str(staging_dir / rel), target), self.retry_s)
        blob = _manifest_bytes(manifest)
        won = with_retries(f"{uri}: writing {MANIFEST} (nothing published)",
                           lambda: self._create_manifest(uri, blob), self.retry_s)
        if not won:  # another writer's manifest is in place: drop this writer's payload
            try:
                self.fs.rm(root, recursive=True)
            except Exception:  # best effort: an unnamed payload is never read
                pass

    def _create_manifest(self, uri: str, blob: bytes) -> bool:
        """Write the manifest unless one exists; True when this call wrote it."""
        final = _join(self._path(uri), MANIFEST)
        if "s3" in ((self.fs.protocol,) if isinstance(self.fs.protocol, str) else self.fs.protocol):
            from fsspec.asyn import sync

            bucket, key, _ = self.fs.split_path(final)
            try:
                sync(self.fs.loop, self.fs._call_s3, "put_object", Bucket=bucket, Key=key, Body=blob,
                     IfNoneMatch="*")
            except Exception as exc:
                # s3fs turns 412 PreconditionFailed into FileExistsError; 409 ConditionalRequestConflict:
                # another create of the same key in flight
                lost = isinstance(exc, FileExistsError) or any(
                    code in repr(exc) for code in ("PreconditionFailed", "ConditionalRequestConflict"))
                if lost and self._published(uri):
                    return False
                raise
            self.fs.invalidate_cache(self._path(uri))
            return True
        # object stores without a create-only write: check, then write (two writers can both
        # get here; their manifests then differ only in payload and time, and the last one stands)
        if self._published(uri):
            return False
        self.fs.pipe_file(final, blob)
        return True

    def _write_manifest(self, directory: str, manifest: Manifest) -> None:
        """Local: write a temp file next to it and rename, so the manifest appears atomically."""
        blob = _manifest_bytes(manifest)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".manifest-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(blob)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the artifact's other files are not
        os.replace(tmp, os.path.join(directory, MANIFEST))

    def fetch(self, uri: str, local_dir: str | Path | None = None, verify: bool = True) -> Path:
        """A local directory holding the complete artifact at ``uri``, checksums verified."""
        return fetch(uri, local_dir, verify, self.fs)


def file_uri(uri: str, rel: str, fs: fsspec.AbstractFileSystem | None = None) -> str:
    """Where file ``rel`` of the complete artifact at ``uri`` lives (under its
    manifest's payload prefix on object stores): for readers that stream one
    file instead of fetching the artifact."""
    why = unsafe_relpath(rel)
    if why:
        raise ArtifactError(f"{uri}: file name {rel!r:.80} is not a safe relative path ({why})")
    manifest = read_manifest(uri, fs)
    if rel not in manifest.files:
        raise ArtifactError(f"{uri}: the artifact has no file {rel}")
    fs, root = _fs_and_path(uri, fs)
    if _is_local(fs):  # symbolic links inside a local artifact may not lead out of it
        _contained(_contained(root, manifest.payload, uri, "payload") if manifest.payload else root, rel, uri,
                   "file")
    return _join(uri, manifest.payload, rel)


def fetch(
    uri: str,
    local_dir: str | Path | None = None,
    verify: bool = True,
    fs: fsspec.AbstractFileSystem | None = None,
) -> Path:
    """A local directory holding the complete artifact at ``uri``, checksums verified.

    Local artifacts are read in place; remote ones are downloaded first.
    """
    manifest = read_manifest(uri, fs)  # every path it names is checked to be a safe relative one
    fs, src = _fs_and_path(uri, fs)
    if _is_local(fs):  # on this disk, symbolic links inside the artifact may not lead out of it
        source = _contained(src, manifest.payload, uri, "payload") if manifest.payload else Path(src)
        for rel in manifest.files:
            _contained(source, rel, uri, "file")
    if local_dir is None and _is_local(fs):
        local = source
    else:
        local = Path(local_dir or tempfile.mkdtemp(prefix=f"flowrl-{manifest.stage}-"))
        for rel in manifest.files:
            target = _contained(local, rel, uri, "file")  # nor may one in the target: checked before writing
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(_join(src, manifest.payload, rel), str(target))
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
