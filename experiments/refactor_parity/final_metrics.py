"""The final metrics of every committed stage under an artifact root, without timings, as one JSON
document: two runs of the smoke pipeline (before and after a refactor, on one machine) compare equal
when the refactor changed no result.

    python experiments/refactor_parity/final_metrics.py ROOT > metrics.json
    python experiments/refactor_parity/final_metrics.py --compare A.json B.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

def _kept(key: str) -> bool:
    """Timings (keys ending in _s) and artifact locations (keys ending in uri) differ between any two runs."""
    return not key.endswith(("_s", "uri"))


def _strip(value):
    """``value`` without timings and artifact locations, recursively."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if _kept(k)}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def final_metrics(root: Path) -> dict:
    """{stage: metrics and the sha256 of its model weights} of the newest committed version of each stage under ``root`` (one per stage in a
    fresh run); artifact versions differ between code versions, so stages are keyed by name alone."""
    found = {}
    for metrics in sorted(root.glob("*/*/metrics.json")):
        stage = metrics.parent.parent.name
        if not (metrics.parent / "manifest.json").is_file():
            continue  # not committed
        if stage in found:
            raise SystemExit(f"{root}: stage {stage} has more than one committed version; use a fresh root")
        found[stage] = _strip(json.loads(metrics.read_text()))
        weights = metrics.parent / "model.safetensors"
        if weights.is_file():  # the trained weights themselves, bit for bit
            found[stage]["model.safetensors sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--compare", action="store_true", help="compare two documents this script wrote")
    args = parser.parse_args(argv)
    if not args.compare:
        json.dump(final_metrics(Path(args.paths[0])), sys.stdout, indent=1, sort_keys=True)
        return 0
    a, b = (json.loads(Path(p).read_text()) for p in args.paths)
    differ = [s for s in sorted(set(a) | set(b)) if a.get(s) != b.get(s)]
    for stage in differ:
        sa, sb = a.get(stage, {}), b.get(stage, {})
        keys = sorted(k for k in set(sa) | set(sb) if sa.get(k) != sb.get(k))
        print(f"{stage}: {len(keys)} keys differ: {', '.join(keys[:8])}")
    print(f"{len(a)} stages, {len(differ)} differ")
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
