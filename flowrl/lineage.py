"""Lineage from MLflow alone: which runs and artifacts a model came from.

Every stage run carries its artifact URI (``flowrl.artifact_uri``), its
inputs' URIs (``flowrl.input.<name>``) and the runs that produced them
(``flowrl.input_run.<name>``, tagged at the start of the run by
:class:`flowrl.tracking.MLflowTracker`). :func:`lineage` walks those tags
from any run back to the base model; nothing is read from the artifact store.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from flowrl.tracking import INPUT_RUN_TAG, INPUT_TAG, MLflowTracker


class LineageError(LookupError):
    """The reference names no run, artifact or registered model version tracked here."""


@dataclass
class LineageNode:
    run_id: str | None
    stage: str
    artifact_uri: str
    registered: str | None = None
    inputs: list[tuple[str, "LineageNode"]] = field(default_factory=list)


def resolve(tracker: MLflowTracker, ref: str) -> str:
    """A run id from a run id, an artifact URI, or a registered model version
    (``models:/NAME/VERSION`` or ``NAME/VERSION``)."""
    from mlflow.exceptions import MlflowException

    client = tracker.client
    if re.fullmatch(r"[0-9a-f]{32}", ref):
        try:
            return client.get_run(ref).info.run_id
        except MlflowException:
            raise LineageError(f"{ref}: no such run in {tracker.tracking_uri}") from None
    model = re.fullmatch(r"(?:models:/)?([^/]+)/(\d+)", ref)
    if model and not ref.startswith(("/", ".")):
        try:
            version = client.get_model_version(model.group(1), model.group(2))
        except MlflowException:
            version = None
        if version is not None:
            if not version.run_id:
                raise LineageError(f"{ref}: the model version names no run")
            return version.run_id
    run_id = tracker.run_of_artifact(ref)
    if run_id is None:
        raise LineageError(f"{ref}: not a run id, a registered model version, or an artifact URI that a tracked "
                           f"run committed (tracking store {tracker.tracking_uri})")
    return run_id


def lineage(tracker: MLflowTracker, run_id: str, _seen: dict | None = None) -> LineageNode:
    """The tree of runs behind ``run_id`` (a shared ancestor appears once per path)."""
    run = tracker.client.get_run(run_id)
    tags = run.data.tags
    node = LineageNode(run_id, tags.get("flowrl.stage", "?"), tags.get("flowrl.artifact_uri", ""),
                       tags.get("flowrl.registered_model"))
    producers = {k[len(INPUT_RUN_TAG):]: v for k, v in tags.items() if k.startswith(INPUT_RUN_TAG)}
    for key, uri in sorted(tags.items()):
        if not key.startswith(INPUT_TAG):
            continue
        name = key[len(INPUT_TAG):]
        if name in producers:
            node.inputs.append((name, lineage(tracker, producers[name])))
        elif "/" in uri or ":" in uri:  # an artifact nobody tracked here (e.g. made with --no-tracking)
            node.inputs.append((name, LineageNode(None, "untracked", uri)))
    return node


def render(node: LineageNode) -> str:
    """The tree as text, the model first and its inputs indented below it."""
    lines: list[str] = []

    def label(n: LineageNode, name: str | None) -> str:
        head = f"{name}: " if name else ""
        reg = f" [{n.registered}]" if n.registered else ""
        run = f" run {n.run_id}" if n.run_id else " (no tracked run)"
        return f"{head}{n.stage}{reg}{run}  {n.artifact_uri}"

    def walk(n: LineageNode, prefix: str) -> None:
        for i, (name, child) in enumerate(n.inputs):
            last = i == len(n.inputs) - 1
            lines.append(f"{prefix}{'`-- ' if last else '|-- '}{label(child, name)}")
            walk(child, prefix + ("    " if last else "|   "))

    lines.append(label(node, None))
    walk(node, "")
    return "\n".join(lines) + "\n"
