"""Runs the smoke pipeline (configs/smoke.yaml, through `pyflyte run`) at a reference commit and in this
checkout, on this machine one after the other, and compares their final metrics and trained weights
(final_metrics.py): a refactor that changed no result leaves them equal.

    python -m experiments.refactor_parity.parity --ref 418fb81 --output experiments/refactor_parity/results/parity.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from experiments.refactor_parity.final_metrics import final_metrics

ROOT = Path(__file__).resolve().parents[2]


def _git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def run_smoke(tree: Path, work: Path) -> tuple[dict, float]:
    """The smoke pipeline of ``tree`` (its own code and configs/smoke.yaml) with artifacts and tracking
    under ``work``: (final metrics, wall seconds)."""
    work.mkdir(parents=True)
    config = (tree / "configs" / "smoke.yaml").read_text()
    lines = []
    for line in config.splitlines():  # only where it writes: the run's results do not depend on it
        key = line.strip().split(":", 1)[0]
        if line.startswith("  ") and key == "artifact_root":
            line = f"  artifact_root: {work / 'artifacts'}"
        elif line.startswith("  ") and key == "tracking_uri":
            line = f"  tracking_uri: sqlite:///{work / 'mlflow.db'}"
        lines.append(line)
    (work / "smoke.yaml").write_text("\n".join(lines) + "\n")
    pyflyte = Path(sys.executable).parent / "pyflyte"
    env = {**os.environ, "PYTHONPATH": str(tree), "HOME": str(work / "home")}
    start = time.perf_counter()
    proc = subprocess.run([str(pyflyte), "run", "pipelines/post_train.py", "post_train", "--config",
                           str(work / "smoke.yaml")], cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (work / "run.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        raise SystemExit(f"the smoke pipeline of {tree} failed (exit {proc.returncode}); see {work / 'run.log'}")
    return final_metrics(work / "artifacts"), wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", required=True, help="the commit to compare against")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    ref = _git("rev-parse", args.ref)
    head = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    with tempfile.TemporaryDirectory(prefix="flowrl-parity-") as tmp:
        tmp = Path(tmp)
        _git("worktree", "add", "--detach", str(tmp / "ref"), ref)
        try:
            before, ref_s = run_smoke(tmp / "ref", tmp / "ref-run")
        finally:
            _git("worktree", "remove", "--force", str(tmp / "ref"))
        after, head_s = run_smoke(ROOT, tmp / "head-run")
    differ = {stage: sorted(k for k in set(before.get(stage, {})) | set(after.get(stage, {}))
                            if before.get(stage, {}).get(k) != after.get(stage, {}).get(k))
              for stage in sorted(set(before) | set(after)) if before.get(stage) != after.get(stage)}
    result = {
        "ref": ref, "head": head, "head_dirty": dirty,
        "stages": sorted(after), "differ": differ,
        "weights_compared": sorted(s for s, m in after.items() if "model.safetensors sha256" in m),
        "wall_s": {"ref": round(ref_s, 1), "head": round(head_s, 1)},
        "final_metrics": after,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"{len(after)} stages; {len(differ)} differ from {ref[:7]}" + (f": {', '.join(differ)}" if differ else ""))
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
