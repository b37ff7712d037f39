"""Name, build and push the container images (`make images`).

    python images/build.py --registry R            # build every image (needs a reachable docker engine)
    python images/build.py --registry R --push     # build, then push each image
    python images/build.py --registry R --dry-run  # print the builds it would run, touch nothing
    python images/build.py --registry R --flags    # print only pyflyte's --image flags

An image's tag is ``<package version>-<digest>``, the digest covering everything
that goes into the image: its Dockerfile and build arguments, the digest of the
image it is built FROM (so a change to the shared base retags every image on
it), every file its Dockerfile COPYs (the COPY lines are parsed; directories are
walked, Python caches skipped) and the .dockerignore that filters them. One
checkout gives the same tags on every machine and one tag never names two
contents. :func:`image_uri` is what the Flyte tasks name; it reads files only
(no docker engine, well under a second), and this file imports nothing outside
the standard library at module level, so it can be loaded by path
(``importlib.util.spec_from_file_location``) from a checkout.

The registry is ``--registry``, else ``launch.registry`` of ``--config``, else
``FLOWRL_REGISTRY``, else ``localhost:5000``. ``FLOWRL_IMAGE_TAG`` / ``--tag``
still force one tag on every image, which gives up content addressing: tasks that
name :func:`image_uri` will not find such images.
"""

import argparse
import hashlib
import json
import logging
import os
import re
import sys
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REGISTRY = "localhost:5000"
log = logging.getLogger("images.build")


@dataclass(frozen=True)
class ImageSpec:
    dockerfile: str  # relative to the build context, the repository root
    parent: str | None = None  # the image passed as BASE_IMAGE, which the Dockerfile builds FROM
    buildargs: tuple[tuple[str, str], ...] = ()  # fixed build arguments; part of the tag


def _stage_registry():
    """flowrl/stages/registry.py, loaded by path: it imports only the standard library, so naming the
    images needs neither flowrl's dependencies nor torch."""
    import importlib.util

    name = "flowrl_stage_registry"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "flowrl" / "stages" / "registry.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # its dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules[name]


STAGES = _stage_registry().STAGES

# Every image, parents before children: the shared bases, then one per stage of the registry
# (images/<stage>.Dockerfile, built FROM the base the stage names). The CUDA base comes in two
# flavours from one Dockerfile: `runtime` for the stages that only run models, `devel` (nvcc, g++,
# Python headers) under the training images, whose DeepSpeed ops are compiled
# (images/train-base.Dockerfile).
IMAGES: dict[str, ImageSpec] = {
    "cuda-base": ImageSpec("images/cuda-base.Dockerfile", buildargs=(("CUDA_FLAVOR", "runtime"),)),
    "cuda-devel": ImageSpec("images/cuda-base.Dockerfile", buildargs=(("CUDA_FLAVOR", "devel"),)),
    "train-base": ImageSpec("images/train-base.Dockerfile", "cuda-devel"),
    **{stage.image: ImageSpec(f"images/{stage.image}.Dockerfile", stage.image_parent) for stage in STAGES},
}

# The image each Flyte task runs in, by the name the task gives it (`default`: the light tasks that
# validate configs and pass references, on the runtime base).
STAGE_IMAGES: dict[str, str] = {"default": "cuda-base", **{stage.name: stage.image for stage in STAGES}}


class MissingImageSource(FileNotFoundError):
    """A Dockerfile, or a path one of them COPYs, is not in the checkout."""


class DockerfileError(ValueError):
    """A Dockerfile line whose inputs this module cannot hash."""


class DockerStreamError(RuntimeError):
    """The docker engine reported an error inside a build or push stream."""


# --------------------------------------------------------------------------- naming

def repository(image: str) -> str:
    """The repository name of ``image`` (``reward_model`` -> ``flowrl-reward-model``)."""
    return f"flowrl-{image.replace('_', '-')}"


def _resolve(stage: str) -> str:
    image = STAGE_IMAGES.get(stage, stage)
    if image not in IMAGES:
        raise KeyError(f"images/build.py: no image for {stage!r}; stages: {', '.join(STAGE_IMAGES)}; "
                       f"images: {', '.join(IMAGES)}")
    return image


def image_tag(stage: str, root: Path | str = ROOT) -> str:
    """``<version>-<12 hex digits>``: the content tag of the image ``stage`` runs in (a key of
    :data:`STAGE_IMAGES` or of :data:`IMAGES`), computed from the checkout at ``root``."""
    root = Path(root)
    return f"{_version(root)}-{_digest(_resolve(stage), root, {})[:12]}"


def image_uri(stage: str, registry: str, root: Path | str = ROOT) -> str:
    """``REGISTRY/flowrl-IMAGE:TAG`` of the image ``stage`` runs in."""
    return f"{_registry(registry)}/{repository(_resolve(stage))}:{image_tag(stage, root)}"


def _registry(registry: str) -> str:
    value = (registry or "").strip().rstrip("/")
    if not value or "://" in value or any(c.isspace() for c in value):
        raise ValueError(f"images/build.py: registry {registry!r} is not a registry prefix "
                         "(e.g. `ghcr.io/org` or `localhost:5000`, no scheme)")
    return value


def _version(root: Path) -> str:
    path = root / "pyproject.toml"
    if not path.is_file():
        raise MissingImageSource(f"images/build.py: {path} does not exist (the image tag starts with its version)")
    try:
        return tomllib.loads(path.read_text())["project"]["version"]
    except (tomllib.TOMLDecodeError, KeyError) as exc:
        raise ValueError(f"images/build.py: {path}: no [project] version ({exc})") from exc


# --------------------------------------------------------------------------- what goes into an image

def _instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) of each Dockerfile instruction, continuation lines joined."""
    out, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not current):
            continue  # comments (also inside a continued instruction, as docker drops them) and blank lines
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, args = current.strip().partition(" ")
        out.append((keyword.upper(), args.strip()))
        current = ""
    if current.strip():
        keyword, _, args = current.strip().partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def copy_sources(dockerfile: Path | str, root: Path | str = ROOT) -> list[str]:
    """The build-context paths that ``dockerfile``'s COPY and ADD lines read, in order."""
    path = Path(root) / dockerfile
    if not path.is_file():
        raise MissingImageSource(f"images/build.py: {path} does not exist")
    sources: list[str] = []
    for keyword, args in _instructions(path.read_text()):
        if keyword not in ("COPY", "ADD"):
            continue
        where = f"{dockerfile}: {keyword} {args}"
        if args.startswith("["):
            try:
                parts = json.loads(args)
            except json.JSONDecodeError as exc:
                raise DockerfileError(f"{where}: bad JSON form ({exc})") from exc
            flags = []
        else:
            words = args.split()
            flags = [w for w in words if w.startswith("--")]
            parts = [w for w in words if not w.startswith("--")]
        if any(f.startswith("--from") for f in flags):
            raise DockerfileError(f"{where}: copies from another image or stage, whose content is not hashed")
        if len(parts) < 2:
            raise DockerfileError(f"{where}: needs a source and a destination")
        for source in parts[:-1]:
            if source.startswith("<<") or "://" in source or any(c in source for c in "*?[$"):
                raise DockerfileError(f"{where}: source {source!r} (heredoc, URL, wildcard or variable) "
                                      "cannot be hashed; name files or folders of the build context")
            source = source.strip("/") if source not in ("/", ".") else source
            if source in (".", "/", "") or source.startswith(".."):
                raise DockerfileError(f"{where}: source {source!r} is outside a named part of the context")
            sources.append(source)
    return sources


def _skipped(rel: Path) -> bool:
    return "__pycache__" in rel.parts or rel.suffix in (".pyc", ".pyo")


def _files(root: Path, source: str, dockerfile: str) -> list[Path]:
    path = root / source
    if not path.exists():
        raise MissingImageSource(f"images/build.py: {source} (COPY in {dockerfile}) does not exist under {root}")
    if path.is_file():
        return [path]
    found = []
    for folder, dirs, names in os.walk(path):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        found += [Path(folder) / n for n in names if not _skipped(Path(folder, n).relative_to(root))]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def image_files(image: str, root: Path | str = ROOT) -> list[str]:
    """Relative paths of every file hashed into ``image``'s tag, its parents' included (sorted)."""
    root = Path(root)
    image = _resolve(image)
    paths: set[str] = set()
    while image is not None:
        spec = IMAGES[image]
        paths.add(spec.dockerfile)
        for source in copy_sources(spec.dockerfile, root):
            paths.update(p.relative_to(root).as_posix() for p in _files(root, source, spec.dockerfile))
        image = spec.parent
    if (root / ".dockerignore").is_file():
        paths.add(".dockerignore")
    return sorted(paths)


def _digest(image: str, root: Path, memo: dict[str, str]) -> str:
    if image in memo:
        return memo[image]
    spec = IMAGES[image]
    h = hashlib.sha256(b"flowrl-image/1\0")
    dockerfile = root / spec.dockerfile
    if not dockerfile.is_file():
        raise MissingImageSource(f"images/build.py: {spec.dockerfile} (image {image}) does not exist under {root}")
    h.update(f"dockerfile {spec.dockerfile}\0".encode() + dockerfile.read_bytes() + b"\0")
    for key, value in spec.buildargs:
        h.update(f"arg {key}={value}\0".encode())
    if spec.parent is not None:
        h.update(f"from {_digest(spec.parent, root, memo)}\0".encode())
    ignore = root / ".dockerignore"
    if ignore.is_file():  # it decides which files of a copied folder reach the image
        h.update(b"dockerignore\0" + ignore.read_bytes() + b"\0")
    for source in copy_sources(spec.dockerfile, root):
        h.update(f"copy {source}\0".encode())
        for path in _files(root, source, spec.dockerfile):
            data = path.read_bytes()
            h.update(f"file {path.relative_to(root).as_posix()} {len(data)}\0".encode() + data)
    memo[image] = h.hexdigest()
    return memo[image]


# --------------------------------------------------------------------------- building

@dataclass(frozen=True)
class Build:
    name: str  # a key of IMAGES
    dockerfile: str  # relative to the build context (the repository root)
    tag: str  # registry/repository:tag
    buildargs: dict[str, str]

    def command(self) -> str:
        args = "".join(f" --build-arg {k}={v}" for k, v in sorted(self.buildargs.items()))
        return f"docker build -f {self.dockerfile} -t {self.tag}{args} ."


def plan_builds(registry: str, tag: str | None = None, root: Path | str = ROOT) -> list[Build]:
    """One build per image, parents first; ``tag`` forces one tag on all (default: content tags)."""
    root = Path(root)
    registry = _registry(registry)
    refs: dict[str, str] = {}
    builds = []
    for name, spec in IMAGES.items():
        if spec.parent is not None and spec.parent not in refs:
            raise ValueError(f"images/build.py: {name} is listed before its parent {spec.parent}")
        refs[name] = f"{registry}/{repository(name)}:{tag or image_tag(name, root)}"
        args = dict(spec.buildargs) | ({"BASE_IMAGE": refs[spec.parent]} if spec.parent else {})
        builds.append(Build(name, spec.dockerfile, refs[name], args))
    return builds


def image_flags(builds: list[Build]) -> str:
    """``--image NAME=REF`` for pyflyte, one per name in :data:`STAGE_IMAGES`."""
    refs = {b.name: b.tag for b in builds}
    return " ".join(f"--image {stage}={refs[image]}" for stage, image in STAGE_IMAGES.items())


def _events(stream: Iterable) -> Iterable[Mapping]:
    """The engine's JSON events, whether the client decoded them or handed over raw lines."""
    for item in stream:
        if isinstance(item, Mapping):
            yield item
            continue
        text = item.decode(errors="replace") if isinstance(item, bytes) else str(item)
        for line in text.splitlines():
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    yield {"stream": line}


def consume(stream: Iterable, action: str, ref: str) -> dict:
    """Read a build or push stream to its end, logging its progress; raise :class:`DockerStreamError`
    on the first in-band error (the engine reports failures as ``{"error"}`` / ``{"errorDetail"}``
    events, not as an HTTP status). Returns the merged ``aux`` events (the image ID, the pushed digest)."""
    aux: dict = {}
    for event in _events(stream):
        if "error" in event or "errorDetail" in event:
            detail = event.get("errorDetail") or {}
            message = detail.get("message") if isinstance(detail, Mapping) else None
            raise DockerStreamError(f"{action} {ref} failed: {message or event.get('error') or detail}")
        if isinstance(event.get("aux"), Mapping):
            aux.update(event["aux"])
        if text := (event.get("stream") or "").rstrip():
            log.info("%s", text)
        elif event.get("status") and not event.get("progressDetail"):
            log.info("%s %s", event.get("id", ""), event["status"])
    return aux


def build_images(client, builds: list[Build], push: bool = False, root: Path | str = ROOT) -> dict[str, str]:
    """Build each image (parents first) with a docker SDK client, pushing each one after its build when
    ``push``. Returns {ref: pushed digest, or image ID when not pushed}; any engine error raises."""
    done = {}
    for build in builds:
        log.info("building %s", build.tag)
        stream = client.api.build(path=str(root), dockerfile=build.dockerfile, tag=build.tag,
                                  buildargs=build.buildargs, rm=True, decode=True)
        built = consume(stream, "build", build.tag)
        if not built.get("ID"):
            raise DockerStreamError(f"build {build.tag} failed: the stream ended without an image ID")
        done[build.tag] = built["ID"]
        if push:
            name, tag = build.tag.rsplit(":", 1)
            log.info("pushing %s", build.tag)
            pushed = consume(client.api.push(name, tag=tag, stream=True, decode=True), "push", build.tag)
            if not pushed.get("Digest"):
                raise DockerStreamError(f"push {build.tag} failed: the stream ended without a pushed digest")
            done[build.tag] = pushed["Digest"]
    return done


def config_registry(path: Path | str) -> str:
    """``launch.registry`` of a flowrl config file (read as plain YAML)."""
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    registry = (data.get("launch") or {}).get("registry") if isinstance(data, dict) else None
    if not registry:
        raise SystemExit(f"images/build.py: {path} has no launch.registry; pass --registry")
    return str(registry)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--registry", help="registry prefix, e.g. ghcr.io/org (see the module doc for defaults)")
    parser.add_argument("--config", help="a flowrl config whose launch.registry is the registry")
    parser.add_argument("--tag", default=os.environ.get("FLOWRL_IMAGE_TAG"),
                        help="one tag for every image instead of the content tags (FLOWRL_IMAGE_TAG)")
    parser.add_argument("--dry-run", action="store_true", help="print the builds, run nothing")
    parser.add_argument("--push", action="store_true", help="push every image after building it")
    parser.add_argument("--flags", action="store_true", help="print only the --image flags for pyflyte")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    registry = args.registry or (config_registry(args.config) if args.config else None) \
        or os.environ.get("FLOWRL_REGISTRY") or DEFAULT_REGISTRY
    builds = plan_builds(registry, args.tag)
    if args.flags:
        print(image_flags(builds))
        return 0
    if args.dry_run:
        for build in builds:
            print(build.command())
        print(f"# pyflyte package/register flags: {image_flags(builds)}")
        return 0
    import docker
    from docker.errors import DockerException

    try:
        client = docker.from_env()
        client.ping()
    except DockerException as exc:
        print(f"make images: no docker engine reachable ({exc.__class__.__name__}: {exc}); start one or set "
              "DOCKER_HOST, or use `make images DRY_RUN=1` to print the builds", file=sys.stderr)
        return 1
    try:
        build_images(client, builds, push=args.push)
    except (DockerStreamError, DockerException) as exc:
        print(f"make images: {exc}", file=sys.stderr)
        return 1
    print(f"pyflyte package/register flags: {image_flags(builds)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
