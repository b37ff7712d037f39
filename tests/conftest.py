"""Shared fixtures: scenario configs pointed at temporary storage."""

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, scenario: str = "smoke.yaml", **overrides) -> Path:
    """A copy of configs/<scenario> with artifacts and tracking under tmp_path.

    ``overrides`` are section -> {key: value} dicts merged into the YAML.
    """
    data = yaml.safe_load((ROOT / "configs" / scenario).read_text())
    data["run"]["artifact_root"] = str(tmp_path / "artifacts")
    data["run"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def smoke_config(tmp_path) -> Path:
    return write_config(tmp_path)
