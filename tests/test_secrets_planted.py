"""Secrets planted in every place a user can put one (the environment, URLs with userinfo in config
keys and on the command line, an artifact URI) never come out: a shapes stage runs through the CLI
against a real MLflow server on loopback (its URI with a password in it) with the artifacts on the
S3 test server (moto), then the tracking store, its artifacts, the artifact store, the results file,
stdout, stderr and the log records are searched for every planted string."""

import logging
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from flowrl.cli import main
from tests.conftest import ROOT, mlflow_server_at, write_config

# one distinct string per place, so a leak says where it came from
ENV_SECRETS = {
    "MLFLOW_TRACKING_TOKEN": "envsecret-mlflow-token-4b1e",
    "AWS_SECRET_ACCESS_KEY": "envsecret-aws-secret-9c7d",
    "FLOWRL_REWARD_TOKEN": "envsecret-reward-token-2f60",  # a reward token in the environment
    "HF_TOKEN": "envsecret-hf-token-d83a",
}
TRACKING_PW = "trkpw-S3cr3t-51aa"  # run.tracking_uri: the real server, reached with user:password@
REWARD_PW = "rwdpw-S3cr3t-77b2"  # grpo.reward_url in the config file
SET_PW = "setpw-S3cr3t-0c94"  # grpo.reward_url again, on the command line (--set)
CONFIG_PW = "cfgpw-S3cr3t-e615"  # another URL-valued config key (model.qwen_image.pretrained, logged by base)
OUTPUT_PW = "outpw-S3cr3t-3d28"  # an --output URI with credentials
INPUT_PW = "inpw-S3cr3t-a4c1"  # an input artifact URI with credentials
PLANTED = (*ENV_SECRETS.values(), TRACKING_PW, REWARD_PW, SET_PW, CONFIG_PW, OUTPUT_PW, INPUT_PW)


@pytest.fixture(scope="module")
def secret_server(s3_server, tmp_path_factory):
    """A real MLflow tracking server on loopback, its artifacts proxied into the S3 test server;
    yields (URL, its root directory holding the backend store and the server's log, the S3 prefix)."""
    root = tmp_path_factory.mktemp("mlflow-secrets")
    artifacts = f"{s3_server}/secrets-mlflow-artifacts"
    with mlflow_server_at(root, artifacts) as url:
        yield url, root, artifacts


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _leaks(texts: dict[str, str]) -> list[str]:
    return [f"{secret} in {where}" for where, text in texts.items() for secret in PLANTED if secret in text]


def _mlflow_texts(client: MlflowClient, tmp_path: Path) -> dict[str, str]:
    """Everything the tracking server hands back: experiments, runs (params, tags, metrics, dataset
    inputs), registered models and versions, and every artifact of every run (downloaded)."""
    texts = {}
    for exp in client.search_experiments():
        texts[f"experiment {exp.name}"] = repr(exp)
        for run in client.search_runs([exp.experiment_id]):
            texts[f"run {run.info.run_id}"] = repr(run.to_dictionary())
            target = tmp_path / "downloaded" / run.info.run_id
            target.mkdir(parents=True)
            client.download_artifacts(run.info.run_id, "", str(target))
            for path in target.rglob("*"):
                if path.is_file():
                    texts[f"mlflow artifact {path.relative_to(target)}"] = path.read_bytes().decode("latin-1")
    for model in client.search_registered_models():
        texts[f"model {model.name}"] = repr(model)
        for version in client.search_model_versions(f"name = '{model.name}'"):
            texts[f"model version {model.name}/{version.version}"] = repr(dict(version))
    return texts


def _s3_texts(prefixes: list[str]) -> dict[str, str]:
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    texts = {}
    for prefix in prefixes:
        fs.invalidate_cache()
        for path in fs.find(prefix):
            texts[f"s3://{path}"] = fs.cat_file(path).decode("latin-1")
    return texts


@pytest.mark.bad_input
def test_planted_secrets_reach_no_store_log_or_file(secret_server, s3_server, tmp_path, monkeypatch, capsys, caplog):
    url, server_root, mlflow_artifacts = secret_server
    for name, value in ENV_SECRETS.items():
        monkeypatch.setenv(name, value)
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # set from the URI: put back after
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    torch.set_num_threads(1)
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="flowrl")
    store = f"{s3_server}/secrets-{tmp_path.name}"
    tracking_uri = url.replace("http://", f"http://alice:{TRACKING_PW}@")
    config = write_config(
        tmp_path / "cfg", run={"artifact_root": store, "tracking_uri": tracking_uri},
        # (a URL with credentials and grpo.reward_token_env together are refused at load: the token stays in env)
        grpo={"reward_backend": "server", "reward_url": f"http://bob:{REWARD_PW}@127.0.0.1:{_closed_port()}"},
        model={"qwen_image": {"pretrained": f"s3://AKIAPLANTED:{CONFIG_PW}@weights/qwen-image"}},
    )
    results = tmp_path / "results" / "base.json"

    # the shapes base stage, every secret in place
    argv = ["base", "--config", str(config), "--no-progress", "--results", str(results),
            "--set", f"grpo.reward_url=http://carol:{SET_PW}@127.0.0.1:{_closed_port()}", "--set", "base.steps=4"]
    monkeypatch.setattr(sys, "argv", ["flowrl", *argv])  # as the console script has it (the results file's command)
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    base_uri = out.strip().splitlines()[-1]
    assert base_uri.startswith(store + "/base/")
    # the Flyte pipeline's parent run logs the whole config: the URL-valued keys of every section
    from flowrl.config import load_config
    from flowrl.tracking import make_tracker

    loaded = load_config(config, [f"grpo.reward_url=http://carol:{SET_PW}@127.0.0.1:1"])
    pipeline_run = make_tracker(loaded).start_pipeline(loaded, "secrets")

    # credentials in an --output and in an input URI: refused before any work, said without them
    failures = {}
    for argv in (["base", "--config", str(config), "--output", f"s3://AKIAPLANTED:{OUTPUT_PW}@bucket/out"],
                 ["annotate", "--config", str(config), "--base",
                  base_uri.replace("s3://", f"s3://AKIAPLANTED:{INPUT_PW}@")]):
        code = main(argv)
        failures[argv[0]] = (code, capsys.readouterr())
    for name, (code, (fail_out, fail_err)) in failures.items():
        assert code == 2, (name, fail_err[-2000:])
        assert "s3://***@" in fail_err and "may not carry credentials" in fail_err, fail_err[-2000:]
        err += fail_err
        out += fail_out

    # what a user and a team see: stdout, stderr, the log records, the results file
    texts = {"stdout": out, "stderr": err, "log records": caplog.text,
             "log messages": "\n".join(r.getMessage() for r in caplog.records),
             "results file": results.read_text()}
    assert "grpo.reward_url=http://***@127.0.0.1" in texts["results file"]  # the command line, masked
    # the tracking store as the server hands it back, and its files (backend store, server log)
    client = MlflowClient(tracking_uri=url)
    texts.update(_mlflow_texts(client, tmp_path))
    for path in server_root.rglob("*"):
        if path.is_file():
            texts[f"server file {path.name}"] = path.read_bytes().decode("latin-1")
    # the artifact store and the server's artifact store, object by object
    texts.update(_s3_texts([store, mlflow_artifacts]))
    # anything else written under this test's directory, but the config file the secrets were planted in
    for path in tmp_path.rglob("*"):
        if path.is_file() and path != config and "downloaded" not in path.parts:
            texts[f"file {path.relative_to(tmp_path)}"] = path.read_bytes().decode("latin-1")

    assert _leaks(texts) == []
    # the planted values did travel: masked, not absent
    experiment = client.get_experiment_by_name("smoke").experiment_id
    base_run = client.search_runs([experiment], filter_string="tags.`flowrl.stage` = 'base'")[0]
    assert base_run.data.params["model.qwen_image.pretrained"] == "s3://***@weights/qwen-image"
    pipeline = client.get_run(pipeline_run).data.params
    assert pipeline["grpo.reward_url"].startswith("http://***@127.0.0.1:")
    assert pipeline["run.tracking_uri"] == tracking_uri.replace(f"alice:{TRACKING_PW}", "***")
    assert any(name.startswith("s3://") and name.endswith("manifest.json") for name in texts)
    assert "server file mlflow.db" in texts and any(name.startswith("mlflow artifact") for name in texts)
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == ENV_SECRETS["AWS_SECRET_ACCESS_KEY"]  # it was there to leak


@pytest.mark.bad_input
def test_a_reward_server_error_names_the_url_without_its_credentials(monkeypatch, capsys, caplog):
    """A RewardClient error (the server at grpo.reward_url unreachable) reaches the CLI's error line
    with the URL's userinfo masked, and aiohttp took the URL with its userinfo."""
    from flowrl import cli
    from flowrl.rewards.client import RewardClient

    reward_url = f"http://bob:{REWARD_PW}@127.0.0.1:{_closed_port()}"

    def dispatch(args):
        client = RewardClient(reward_url, "t2i", retries=1, backoff_s=0.01, timeout_s=5)  # basic auth from the URL
        try:
            client.score(torch.zeros(2, 3, 8, 8), ["a red circle", "a blue square"])
        finally:
            client.close()
        return 0

    monkeypatch.setattr(cli, "_dispatch", dispatch)
    caplog.set_level(logging.DEBUG, logger="flowrl")
    assert main(["validate", "--config", str(ROOT / "configs" / "smoke.yaml")]) == 1
    err = capsys.readouterr().err
    assert "http://***@127.0.0.1" in err and "no successful answer" in err, err
    assert not _leaks({"stderr": err, "logs": caplog.text})


@pytest.mark.bad_input
def test_the_grpo_sidecar_asks_for_the_configured_token(monkeypatch, tmp_path):
    """grpo.reward_token_env set and no reward_url: the sidecar reward server GRPO starts answers
    /score only with that token (401 without), and GRPO's client sends it."""
    import urllib.error

    from flowrl.config import load_config
    from flowrl.rewards import server as reward_server
    from flowrl.stages.grpo import _reward_backend

    token = ENV_SECRETS["FLOWRL_REWARD_TOKEN"]
    monkeypatch.setenv("FLOWRL_REWARD_TOKEN", token)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the sidecar imports the test rewards
    config = load_config(write_config(tmp_path), ["grpo.reward_backend=server",
                                                  "grpo.reward_token_env=FLOWRL_REWARD_TOKEN"])
    real_launch = reward_server.launch_server
    launched = {}

    def launch(rewards, **kwargs):  # GRPO's own launch, with a fake reward in place of the reward model's
        launched.update(kwargs)
        return real_launch({name: "tests.rewards.fake_rewards:brightness" for name in rewards},
                           **{**kwargs, "reward_kwargs": None, "cwd": ROOT})

    monkeypatch.setattr(reward_server, "launch_server", launch)
    client, sidecar = _reward_backend(config, "t2i", None, "unused-reward-model-uri")
    try:
        assert launched["token_env"] == "FLOWRL_REWARD_TOKEN" and sidecar is not None
        size = config.world.resolution
        scores = client.score(torch.rand(2, 3, size, size), ["a red circle", "a blue square"])  # sends the token
        assert scores.shape == (2,)
        request = urllib.request.Request(f"{sidecar.base_url}/score/t2i", data=b"{}",
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=10)
        assert info.value.code == 401
    finally:
        client.close()
        sidecar.stop()
