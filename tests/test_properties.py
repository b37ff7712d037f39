"""Property-based tests (hypothesis): whatever the input, the config loader,
the manifest reader and the reward server's request parsing give a result or
their clear error, never another exception."""

import json

import yaml
from fastapi import HTTPException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowrl.config import ConfigError, FlowRLConfig, from_dict, load_config
from flowrl.rewards.server import decode_batch, parse_request
from flowrl.storage import ArtifactError, read_manifest

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                           max_size=4), max_leaves=12)
SECTIONS = [f.name for f in FlowRLConfig.__dataclass_fields__.values()]
keys = st.sampled_from(SECTIONS + ["lr", "seed", "nonsense"])
# configs that look like ours: real section names with real and made-up keys
config_like = st.dictionaries(keys, st.one_of(values, st.dictionaries(
    st.sampled_from(["seed", "lr", "steps", "name", "family", "scorer", "anchor", "iterations", "bogus"]), values,
    max_size=4)), max_size=5)


@SETTINGS
@given(data=config_like)
def test_config_loader_gives_a_config_or_a_config_error(data):
    try:
        config = from_dict(FlowRLConfig, data)
    except ConfigError:
        return
    assert isinstance(config, FlowRLConfig)


@SETTINGS
@given(text=st.text(max_size=200))
def test_config_files_of_any_text(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    try:
        load_config(path)
    except ConfigError as exc:
        assert str(path) in str(exc)


@SETTINGS
@given(data=config_like)
def test_config_files_of_any_yaml_mapping(tmp_path, data):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    try:
        load_config(path)
    except ConfigError as exc:
        assert str(path) in str(exc)


manifest_like = st.dictionaries(st.sampled_from(["stage", "version", "config_hash", "code_version", "inputs", "files",
                                                 "created_unix", "format", "extra", "junk"]), values, max_size=10)


@SETTINGS
@given(payload=st.one_of(st.binary(max_size=200), manifest_like.map(lambda d: json.dumps(d).encode()),
                         manifest_like.map(lambda d: json.dumps({**d, "format": 1}).encode())))
def test_manifest_reader_gives_a_manifest_or_an_artifact_error(tmp_path, payload):
    (tmp_path / "manifest.json").write_bytes(payload)
    try:
        manifest = read_manifest(str(tmp_path))
    except ArtifactError as exc:
        assert str(tmp_path) in str(exc)
        return
    assert manifest.format == 1 and isinstance(manifest.files, dict)


request_like = st.dictionaries(st.sampled_from(["reward", "prompts", "images", "sources", "junk"]), st.one_of(
    values, st.fixed_dictionaries({"dtype": st.sampled_from(["uint8", "float32", "x"]),
                                   "shape": st.lists(st.integers(-2, 40), max_size=5),
                                   "data": st.text(alphabet="ABCD=+/", max_size=40)})), max_size=5)


@SETTINGS
@given(body=st.one_of(st.binary(max_size=200), request_like.map(lambda d: json.dumps(d).encode())))
def test_reward_requests_parse_or_are_refused_with_a_4xx(body):
    try:
        request = parse_request(body)
    except HTTPException as exc:
        assert 400 <= exc.status_code < 500 and exc.detail
        return
    for payload in [request.images] + ([request.sources] if request.sources is not None else []):
        try:
            decode_batch(payload, "images", max_batch=64)
        except HTTPException as exc:
            assert 400 <= exc.status_code < 500 and exc.detail
