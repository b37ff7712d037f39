"""Build and tag the container images with the docker SDK (`make images`).

    python images/build.py            # build every image (needs a reachable docker engine)
    python images/build.py --dry-run  # print the builds it would run, touch nothing
    python images/build.py --push     # build, then push to the registry

The registry prefix comes from ``FLOWRL_REGISTRY`` (default ``localhost:5000``)
and the tag from ``FLOWRL_IMAGE_TAG``, by default ``<package version>-<code
version>`` where the code version hashes the library's source and the image
requirement files, so a tag names exactly the code inside it. The shared CUDA
base is built first; each stage image is built ``FROM`` it. The ``--image``
arguments for ``pyflyte package`` / ``register`` are printed at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGE_IMAGES = ("base", "annotate", "reward_model", "filter_prompts", "grpo", "opd", "bench")


@dataclass(frozen=True)
class Build:
    name: str  # flyte image name: the key of {{.image.NAME}} in the tasks
    dockerfile: str  # relative to the build context (the repository root)
    tag: str  # registry/repository:tag
    buildargs: dict[str, str]

    def command(self) -> str:
        args = "".join(f" --build-arg {k}={v}" for k, v in sorted(self.buildargs.items()))
        return f"docker build -f {self.dockerfile} -t {self.tag}{args} ."


def image_tag() -> str:
    if tag := os.environ.get("FLOWRL_IMAGE_TAG"):
        return tag
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    sys.path.insert(0, str(ROOT))
    from flowrl.storage import code_version

    digest = hashlib.sha256(code_version().encode())
    for path in sorted((ROOT / "images" / "requirements").glob("*.txt")):
        digest.update(path.read_bytes())
    return f"{version}-{digest.hexdigest()[:12]}"


def plan_builds(registry: str | None = None, tag: str | None = None) -> list[Build]:
    """The cuda base first, then one image per stage on top of it."""
    registry = (registry if registry is not None else os.environ.get("FLOWRL_REGISTRY", "localhost:5000")).rstrip("/")
    tag = tag or image_tag()
    base = Build("cuda-base", "images/cuda-base.Dockerfile", f"{registry}/flowrl-cuda-base:{tag}", {})
    stages = [Build(s, f"images/{s}.Dockerfile", f"{registry}/flowrl-{s.replace('_', '-')}:{tag}",
                    {"BASE_IMAGE": base.tag}) for s in STAGE_IMAGES]
    return [base, *stages]


def image_flags(builds: list[Build]) -> str:
    """``--image NAME=TAG`` for pyflyte (``default`` is the shared base)."""
    flags = [f"--image default={builds[0].tag}"] + [f"--image {b.name}={b.tag}" for b in builds[1:]]
    return " ".join(flags)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the builds, run nothing")
    parser.add_argument("--push", action="store_true", help="push every image after building")
    parser.add_argument("--flags", action="store_true", help="print only the --image flags for pyflyte")
    args = parser.parse_args(argv)
    builds = plan_builds()
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
    for build in builds:
        print(f"building {build.tag}", flush=True)
        client.images.build(path=str(ROOT), dockerfile=build.dockerfile, tag=build.tag, buildargs=build.buildargs,
                            rm=True)
        if args.push:
            repository, tag = build.tag.rsplit(":", 1)
            client.images.push(repository, tag=tag)
    print(f"pyflyte package/register flags: {image_flags(builds)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
