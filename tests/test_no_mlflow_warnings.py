"""A stage's MLflow logging raises no warning: its dataset sources are named (a local path used to
match MLflow's local source twice and warn that it was ambiguous) and the schemas of the tables it
logs are declared (MLflow's inference warned on every integer column)."""

import io
import json
import warnings

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from flowrl.config import FlowRLConfig, from_dict
from flowrl.tracking import MLflowTracker, declared_schema
from tests.test_tracking import commit_artifact


def _parquet(frame: pd.DataFrame) -> bytes:
    out = io.BytesIO()
    frame.to_parquet(out)
    return out.getvalue()


def _tables() -> dict[str, bytes]:
    """Annotation tables with integer, float, bool and string columns (and an image column, left out)."""
    pointwise = pd.DataFrame({"prompt": ["a red circle", "two squares"], "category": ["colors", "counting"],
                              "image": [b"png", b"png"], "alignment": np.array([3, 5], dtype=np.int64),
                              "score": [0.5, 0.25], "valid": [True, False]})
    pairwise = pd.DataFrame({"prompt": ["a red circle"], "category": ["colors"], "rank": np.array([1], np.int32)})
    return {"pointwise.parquet": _parquet(pointwise), "pairwise.parquet": _parquet(pairwise)}


def test_logging_a_stage_with_dataset_inputs_and_tables_raises_no_warning(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = from_dict(FlowRLConfig, {"run": {"name": "quiet", "tracking_uri": uri}})
    root = str(tmp_path / "artifacts")
    base = commit_artifact(root, "base", config)
    annotations = commit_artifact(root, "annotate", config, inputs={"base": base}, files=_tables())
    labels = tmp_path / "labels.parquet"
    labels.write_bytes(b"labels")
    inputs = {"base": base, "labels": f"{labels}#0123456789abcdef", "also_file": f"file://{labels}#0123456789abcdef"}
    tracker = MLflowTracker(uri)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with tracker.stage_run("annotate", config, tags={f"flowrl.input.{k}": v for k, v in inputs.items()}) as t:
            t.set_tags({"flowrl.artifact_uri": annotations})
    # any warning at all from MLflow's code, and any UserWarning from anywhere
    mlflow_warnings = [w for w in caught if "mlflow" in w.filename or issubclass(w.category, UserWarning)]
    assert not mlflow_warnings, [f"{w.category.__name__} at {w.filename}:{w.lineno}: {w.message}" for w in mlflow_warnings]

    run = MlflowClient(uri).get_run(tracker.run_id)
    logged = {d.dataset.name: d.dataset for d in run.inputs.dataset_inputs}
    assert {"annotate/pointwise", "annotate/pairwise"} <= set(logged)  # the logging ran, not skipped
    assert {f"base@{base.rsplit('/', 1)[-1]}", "labels", "also_file"} <= set(logged)
    assert {json.loads(logged[n].source)["uri"] for n in ("labels", "also_file")} == {str(labels), f"file://{labels}"}
    assert logged["labels"].source_type == "local"
    schema = {c["name"]: c["type"] for c in json.loads(logged["annotate/pointwise"].schema)["mlflow_colspec"]}
    assert schema == {"prompt": "string", "category": "string", "alignment": "long", "score": "double",
                      "valid": "boolean"}  # integers declared as such; the image bytes left out
    pairs = json.loads(logged["annotate/pairwise"].schema)["mlflow_colspec"]
    assert {c["name"]: c["type"] for c in pairs}["rank"] == "integer"
    assert json.loads(logged["annotate/pointwise"].profile) == {"num_rows": 2, "num_elements": 10}
    assert len(logged["annotate/pointwise"].digest) == 32


def test_declared_schema_requires_every_column_and_leaves_out_unknown_kinds():
    frame = pd.DataFrame({"n": np.arange(2, dtype=np.uint8), "f": np.ones(2, np.float32),
                          "t": pd.to_timedelta([1, 2], unit="s")})
    columns = declared_schema(frame)["mlflow_colspec"]
    assert columns == [{"type": "integer", "name": "n", "required": True},
                       {"type": "float", "name": "f", "required": True}]
