"""Component configs without the network: the shipped published configs of
the production weights, a local directory first, the local hub cache last."""

import json
import socket
import tomllib

import pytest

from flowrl.config import ConfigError
from flowrl.models.qwen_image_specs import SPECS_DIR, component_configs, known_ids, shipped_spec
from tests.conftest import ROOT


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test, and the hub client is told it is offline."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_known_ids_are_the_shipped_files():
    assert known_ids() == ["Qwen/Qwen-Image", "Qwen/Qwen-Image-Edit", "Qwen/Qwen2.5-VL-7B-Instruct"]
    for path in SPECS_DIR.glob("*.json"):
        spec = json.loads(path.read_text())
        assert path.name == spec["repo_id"].replace("/", "--") + ".json"
        assert spec["revision"] and "published config" in spec["_about"]


def test_the_specs_are_package_data():
    """A non-editable install (the images run `pip install --no-deps .`) must carry the JSON files."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "specs/*.json" in data["flowrl.models"]


def test_qwen_image_parameter_counts_from_the_shipped_specs_on_the_meta_device(no_network):
    from flowrl.planner import qwen_image_components

    counts = qwen_image_components("Qwen/Qwen-Image")
    assert 20.3e9 <= counts["transformer"][0] <= 20.5e9  # the published 20 B MMDiT (20.43 B)
    assert 8.2e9 <= counts["text_encoder"][0] <= 8.4e9  # Qwen2.5-VL-7B with its vision tower (8.29 B)
    assert 0.1e9 <= counts["vae"][0] <= 0.15e9  # the Wan-2.1-style VAE (127 M)
    assert counts["_geometry"] == (60, 24 * 128)
    # the edit pipeline has the same architecture in every counted component
    assert qwen_image_components("Qwen/Qwen-Image-Edit") == counts


def test_the_vlm_reward_backbone_is_the_text_encoders_architecture():
    vlm = component_configs("Qwen/Qwen2.5-VL-7B-Instruct", key="reward_model.vlm_pretrained")
    assert list(vlm) == ["model"]
    assert vlm["model"] == component_configs("Qwen/Qwen-Image")["text_encoder"]


def test_the_shipped_scheduler_gives_qwen_images_schedule():
    from flowrl.models.qwen_image import qwen_image_sigmas
    from tests.models.tiny_qwen_image import SCHEDULER_CONFIG

    scheduler = shipped_spec("Qwen/Qwen-Image")["components"]["scheduler"]
    assert {k: scheduler[k] for k in SCHEDULER_CONFIG} == SCHEDULER_CONFIG  # the tiny test model's copy
    sigmas = qwen_image_sigmas(10, 4096, scheduler)
    assert float(sigmas[0]) == 1.0 and float(sigmas[-1]) == 0.0 and float(sigmas[-2]) == pytest.approx(0.02)


def test_returned_configs_are_copies():
    configs = component_configs("Qwen/Qwen-Image")
    configs["transformer"]["num_layers"] = 1
    assert component_configs("Qwen/Qwen-Image")["transformer"]["num_layers"] == 60


def test_a_local_directory_wins_over_the_shipped_spec(tmp_path, monkeypatch, no_network):
    from tests.models.tiny_qwen_image import TRANSFORMER_CONFIG, build_tiny_qwen_image

    build_tiny_qwen_image(tmp_path / "Qwen" / "Qwen-Image", task="t2i")
    monkeypatch.chdir(tmp_path)  # "Qwen/Qwen-Image" is now also a local directory
    configs = component_configs("Qwen/Qwen-Image")
    assert {"transformer", "vae", "text_encoder", "scheduler"} <= set(configs)
    assert configs["transformer"]["num_layers"] == TRANSFORMER_CONFIG["num_layers"]
    assert configs["scheduler"]["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    # a transformers model directory: its root config.json is the one component
    (tmp_path / "vlm").mkdir()
    (tmp_path / "vlm" / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    assert component_configs(str(tmp_path / "vlm")) == {"model": {"model_type": "qwen2_5_vl"}}


def test_a_repo_in_the_local_hub_cache_is_read_from_there(tmp_path, monkeypatch, no_network):
    import huggingface_hub.constants

    snapshot = tmp_path / "hub" / "models--someone--tuned-qwen-image" / "snapshots" / ("a" * 40)
    (snapshot / "transformer").mkdir(parents=True)
    (snapshot / "transformer" / "config.json").write_text(json.dumps({"num_layers": 7}))
    (snapshot / "model_index.json").write_text(json.dumps({"_class_name": "QwenImagePipeline",
                                                           "transformer": ["diffusers", "X"]}))
    refs = snapshot.parents[1] / "refs"
    refs.mkdir()
    (refs / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert component_configs("someone/tuned-qwen-image") == {"transformer": {"num_layers": 7}}


@pytest.mark.bad_input
def test_an_unknown_id_fails_offline_naming_the_key_and_the_known_ids(tmp_path, monkeypatch, no_network):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(FileNotFoundError) as err:
        component_configs("Qwen/Qwen-Image-2512")
    message = str(err.value)
    assert message.startswith(
        "model.qwen_image.pretrained: cannot read the component configs of 'Qwen/Qwen-Image-2512'")
    assert "Qwen/Qwen-Image, Qwen/Qwen-Image-Edit" in message
    with pytest.raises(FileNotFoundError, match="^reward_model.vlm_pretrained: .*'/no/such/dir'"):
        component_configs("/no/such/dir", key="reward_model.vlm_pretrained")


@pytest.mark.bad_input
def test_broken_local_directories_name_the_key_and_the_problem(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model.qwen_image.pretrained: .*holds no component config"):
        component_configs(str(tmp_path / "empty"))
    (tmp_path / "partial" / "transformer").mkdir(parents=True)
    (tmp_path / "partial" / "transformer" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no 'vae' config among \\['transformer'\\]"):
        component_configs(str(tmp_path / "partial"), required=("transformer", "vae"))
    (tmp_path / "partial" / "transformer" / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="model.qwen_image.pretrained: .*config.json is not valid JSON"):
        component_configs(str(tmp_path / "partial"))


@pytest.mark.bad_input
def test_the_planner_names_the_key_for_a_text_encoder_config_without_model_type(tmp_path):
    from flowrl.planner import qwen_image_components

    spec = component_configs("Qwen/Qwen-Image")
    for name in ("transformer", "vae", "text_encoder"):
        (tmp_path / name).mkdir()
        body = {k: v for k, v in spec[name].items() if k != "model_type"}
        (tmp_path / name / "config.json").write_text(json.dumps(body))
    with pytest.raises(ConfigError, match="model.qwen_image.pretrained: the text_encoder config .* has no model_type"):
        qwen_image_components(str(tmp_path))
