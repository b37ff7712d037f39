"""Hostile config files and overrides (issue 31, bounded inputs): every one is refused quickly with a short
ConfigError naming the file or key, and `flowrl validate` turns it into one line and exit 2."""

import time
import tracemalloc
from pathlib import Path

import pytest
import yaml

from flowrl import config as config_module
from flowrl.cli import main
from flowrl.config import CONFIG_MAX_BYTES, SEED_MAX, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
SHORT = 1500  # an error line stays this short, however large the value it is about (a list of allowed keys included)

pytestmark = pytest.mark.bad_input


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """The "billion laughs" as a config value: each level is a list of `width` aliases of the level before."""
    lol = ", ".join(['"lol"'] * width)
    parts = [f"&l0 [{lol}]"] + [f"&l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "run:\n  name: [" + ", ".join(parts) + "]\n"


def smoke_with(**sections: dict) -> str:
    """configs/smoke.yaml with the given section -> {key: value} entries laid over it, as YAML text."""
    data = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return yaml.safe_dump(data, width=2**31)


def refused(path: Path, *overrides: str, key: str = "") -> str:
    """The ConfigError of loading ``path`` with ``overrides``: short, naming the file, the --set entry or
    ``key``."""
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert len(message) < SHORT, message[:SHORT]
    assert (str(path) in message or any(f"--set '{o[:50]}" in message for o in overrides)
            or (key and message.startswith(f"{key}: "))), message[:SHORT]
    return message


def write(tmp_path: Path, text: str | bytes, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_the_shipped_configs_load_through_the_bounded_loader():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        text = path.read_text()
        assert config_module.parse_yaml(text, str(path)) == yaml.safe_load(text)  # the same data as before
        load_config(path)


def test_an_alias_bomb_fails_fast_with_a_small_error_and_little_memory(tmp_path):
    text = alias_bomb()
    assert len(text) < 1800  # no larger than the report's 1.7 KB bomb (9 levels of 9)
    path = write(tmp_path, text)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        message = refused(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 1.0
    assert peak < 50 * 2**20, peak
    assert "alias" in message


def test_an_alias_bomb_in_an_override_fails_the_same_way(tmp_path):
    bomb = "[" + ", ".join(["&a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"] + ["*a"] * 9) + "]"
    for i in range(8):
        bomb = f"[&b{i} {bomb}, " + ", ".join([f"*b{i}"] * 9) + "]"
    path = write(tmp_path, (ROOT / "configs" / "smoke.yaml").read_text())
    start = time.perf_counter()
    message = refused(path, f"grpo.trainable={bomb}")
    assert time.perf_counter() - start < 1.0 and "alias" in message


def test_an_alias_within_the_limits_still_works(tmp_path):
    text = (ROOT / "configs" / "smoke.yaml").read_text().replace("\nbase:\n", "\nbase: &base\n", 1)
    path = write(tmp_path, text + "x_unused: *base\n")
    # the document composes (the alias is fine); the unknown top-level key is what is refused
    assert "x_unused: unknown key" in refused(path)


def test_too_many_values_are_refused_without_aliases_too(tmp_path):
    path = write(tmp_path, "grpo:\n  trainable:\n" + "  - a\n" * (config_module.YAML_MAX_NODES + 1))
    start = time.perf_counter()
    assert f"more than {config_module.YAML_MAX_NODES} values" in refused(path)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("text", ["run: [unclosed\n", "run:\n  seed: 2001-13-45\n", "run:\n  seed: " + "9" * 5000,
                                  "run: !!python/object:os.system {}\n", "a: 1\n---\nb: 2\n", "run: *nowhere\n"])
def test_invalid_yaml_is_one_short_line(tmp_path, text):
    message = refused(write(tmp_path, text))
    assert "invalid YAML" in message and "\n" not in message


def test_a_recursive_alias_is_refused(tmp_path):
    path = write(tmp_path, "run: &a\n  name: [*a]\n")
    assert "recursive" in refused(path)


def test_deep_nesting_is_refused_without_a_recursion_error(tmp_path):
    path = write(tmp_path, "run:\n  name: " + "[" * 20000 + "]" * 20000 + "\n")
    assert "nest" in refused(path)


@pytest.mark.parametrize("size", [CONFIG_MAX_BYTES + 1, 26 * 10**6])
def test_a_file_past_the_size_cap_is_refused_before_parsing(tmp_path, size):
    item = "- 123456\n"
    path = write(tmp_path, "run:\n  name: " + "x" * (size - 14) + "\n" if size < 10**6 * 2 else
                 "grpo:\n  trainable:\n" + item * (size // len(item)))
    start = time.perf_counter()
    message = refused(path)
    assert time.perf_counter() - start < 1.0
    assert str(path.stat().st_size) in message and str(CONFIG_MAX_BYTES) in message


def test_a_binary_file_is_refused(tmp_path):
    path = write(tmp_path, bytes(range(256)) * 8, "model.bin")
    assert "UTF-8" in refused(path)


def test_a_file_with_nul_bytes_is_refused(tmp_path):
    path = write(tmp_path, b"run:\n  name: a\x00b\n")
    assert "NUL" in refused(path)


def test_invalid_utf8_is_refused_naming_the_byte(tmp_path):
    path = write(tmp_path, "run:\n  name: café\n".encode("latin-1"))
    message = refused(path)
    assert "UTF-8" in message and "byte 16" in message


def test_an_unreadable_file_is_a_config_error(tmp_path, monkeypatch):
    path = write(tmp_path, "run: {}\n")

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", denied)  # chmod 0 does not stop root
    assert "cannot read the config file (Permission denied)" in refused(path)


def test_a_non_mapping_file_with_overrides_is_a_config_error(tmp_path):
    path = write(tmp_path, "- 1\n- 2\n")
    assert "expected a mapping" in refused(path, "run.seed=3")


SEED_SECTIONS = ["run", "eval", "annotate", "filter", "grpo", "opd", "bench"]


def test_every_seed_section_is_covered():
    seeded = [f.name for f in config_module.dataclasses.fields(config_module.FlowRLConfig)
              if "seed" in {g.name for g in config_module.dataclasses.fields(f.default_factory())}]
    assert sorted(seeded) == sorted(SEED_SECTIONS)


@pytest.mark.parametrize("section", SEED_SECTIONS)
@pytest.mark.parametrize("seed", [-1, SEED_MAX + 1, 2**70])
def test_seeds_out_of_range_are_refused_in_every_section(tmp_path, section, seed):
    path = write(tmp_path, (ROOT / "configs" / "smoke.yaml").read_text())
    message = refused(path, f"{section}.seed={seed}")
    assert f"{section}.seed: expected int in [0, {SEED_MAX}]" in message


@pytest.mark.parametrize("section", SEED_SECTIONS)
def test_the_largest_seed_is_taken(tmp_path, section):
    path = write(tmp_path, (ROOT / "configs" / "smoke.yaml").read_text())
    assert getattr(load_config(path, [f"{section}.seed={SEED_MAX}"]), section).seed == SEED_MAX


def test_a_huge_seed_in_the_file_is_refused(tmp_path):
    message = refused(write(tmp_path, smoke_with(run={"seed": 2**70})))
    assert "run.seed: expected int in [0, 4294967295], got 1180591620717411303424" in message


@pytest.mark.parametrize("override, key", [
    ("base.steps=1180591620717411303424", "base.steps"),  # no stated upper bound: the generic one
    ("bench.bootstrap=-5", "bench.bootstrap"),
    ("grpo.loop.iterations=0", "grpo.loop.iterations"),
    ("base.steps=true", "base.steps"),
    ("base.steps=3.0", "base.steps"),
    ("grpo.rollout.cfg_mode=1", "grpo.rollout.cfg_mode"),
    ("world.resolution=32.0", "world.resolution"),
    ("world.resolution=10000000", "world.resolution"),
    ("model.qwen_image.height=10000000", "model.qwen_image.height"),
    ("model.qwen_image.width=8192", "model.qwen_image.width"),
    ("model.shapes.width=1000000000", "model.shapes.width"),
    ("model.shapes.depth=100000", "model.shapes.depth"),
    ("reward_model.width=1000000000", "reward_model.width"),
    ("base.batch_size=100000000", "base.batch_size"),
    ("grpo.group_size=100000000", "grpo.group_size"),
    ("sampler.num_steps=100000000", "sampler.num_steps"),
    ("model.qwen_image.lora.rank=100000000", "model.qwen_image.lora.rank"),
    ("launch.grpo.nodes=1180591620717411303424", "launch.grpo.nodes"),
])
def test_counts_and_sizes_out_of_range_are_refused(tmp_path, override, key):
    path = write(tmp_path, (ROOT / "configs" / "smoke.yaml").read_text())
    assert f"{key}: " in refused(path, override)


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1e999"])
@pytest.mark.parametrize("key", ["base.lr", "grpo.rollout.noise_level", "sampler.shift", "bench.tie_tolerance",
                                 "filter.threshold", "launch.gpu_mem_gib", "grpo.kl_anchor_coef"])
def test_non_finite_floats_are_refused(tmp_path, key, value):
    path = write(tmp_path, (ROOT / "configs" / "smoke.yaml").read_text())
    assert f"{key}: expected float" in refused(path, f"{key}={value}")


def test_a_1mb_value_is_cut_in_the_message(tmp_path):
    path = write(tmp_path, smoke_with(base={"steps": "y" * 10**6}))
    message = refused(path)
    assert "base.steps: expected int >= 1" in message and "1000000 characters" in message


@pytest.mark.parametrize("where", ["value", "key", "list", "override", "override_key"])
def test_large_values_are_cut_in_every_message(tmp_path, where):
    big = "z" * 10**6
    smoke = smoke_with()
    overrides = []
    if where == "value":
        smoke = smoke_with(bench={"anchor": big + "/"})  # not a safe name
    elif where == "key":
        smoke += f"{big}: 1\n"
    elif where == "list":
        smoke = smoke_with(base={"steps": [7] * 9000})
    elif where == "override":
        overrides = [f"grpo.sampling_weights=[{big}]"]
    else:
        overrides = [f"grpo.{big}=1"]
    key = {"value": "bench.anchor", "override": "grpo.sampling_weights[0]"}.get(where, "")
    message = refused(write(tmp_path, smoke), *overrides, key=key)
    assert message.count("z") <= 2 * config_module.SHOWN_MAX + 10, message[:SHORT]  # zero_stage has one


def test_shown_cuts_values_and_says_how_large_they_were():
    assert config_module._shown("abc") == "'abc'"
    assert config_module._shown([1, 2]) == "[1, 2]"
    long = config_module._shown("q" * 10**6)
    assert len(long) < config_module.SHOWN_MAX + 40 and "1000000 characters" in long
    nested = config_module._shown([[["x" * 1000] * 1000] * 1000])
    assert len(nested) <= config_module.SHOWN_MAX + 40


@pytest.mark.parametrize("case", ["bomb", "big", "binary", "utf8", "seed", "resolution", "nan", "1mb"])
def test_validate_exits_2_with_one_line(tmp_path, capsys, case):
    texts = {
        "bomb": alias_bomb,
        "big": lambda: "grpo:\n  trainable:\n" + "- 123456\n" * (CONFIG_MAX_BYTES // 9 + 1),
        "binary": lambda: bytes(range(256)) * 8,
        "utf8": lambda: "run:\n  name: café\n".encode("latin-1"),
        "seed": lambda: smoke_with(run={"seed": 2**70}),
        "resolution": lambda: smoke_with(model={"qwen_image": {"height": 10**7}}),
        "nan": lambda: smoke_with(base={"lr": float("nan")}),
        "1mb": lambda: smoke_with(run={"seed": "s" * 10**6}),
    }
    path = write(tmp_path, texts[case]())
    capsys.readouterr()
    assert main(["validate", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("flowrl validate: error: ") and str(path) in err, err
    assert len(err) < SHORT and "Traceback" not in err


@pytest.mark.bad_input
def test_a_reward_url_with_credentials_and_a_bearer_token_is_refused():
    """aiohttp cannot send both (a traceback at the first request before): refused at load, the password masked."""
    from flowrl.config import load_config
    from tests.conftest import ROOT

    with pytest.raises(ConfigError, match="grpo.reward_url: carries user:password") as caught:
        load_config(ROOT / "configs" / "smoke.yaml", ["grpo.reward_backend=server",
                                                       "grpo.reward_url=http://u:hunter2@rm:8000",
                                                       "grpo.reward_token_env=RM_TOKEN"])
    assert "hunter2" not in str(caught.value)
