"""Model families behind one interface, found by name in a registry.

A family is everything the stages, the planner, the config checks and the Flyte tasks need to know about
one kind of model beyond the :class:`~flowrl.models.base.FlowModel` protocol the algorithms use: how its
model artifacts are loaded and saved, which network is trained and how a model is rebuilt around another
copy of it, the task views, the image size, how its rewards are served, its memory figures for the planner
and its config rules. Code outside ``flowrl/models/`` asks ``family_of(config)`` and never compares family
names; adding a family is a subclass of :class:`ModelFamily` with ``@register_family(name)``.

The facts a family states as class attributes:

- ``has_judge``: the shapes world can score an image exactly (its judge); a family without one is
  scored by reward models alone (bench, GRPO's held-out monitor, the reward model's held-out metrics).
- ``from_pretrained``: the base stage references published weights instead of pretraining, and GRPO,
  OPD and the prompt filter run their pretrained-model paths.
- ``prompt_files``: its prompts come from prompt files (flowrl/prompt_files.py), not from the shapes grammar.
- ``model_keys``: its config has the model keys the memory planner may advise (LoRA rank, where the text
  encoder runs, the decode batch), and Flyte's requests of its training tasks come from the planner.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from flowrl.config import ConfigError, FlowRLConfig
from flowrl.models import (
    _DTYPES,
    QWEN_REFERENCE,
    QWEN_TRANSFORMER,
    CheckpointError,
    FlowModel,
    _artifact_transformer,
    load_checkpoint,
    local_device,
    pretrained_path,
    save_checkpoint,
)

__all__ = ["ModelFamily", "register_family", "family_of", "family_names", "family_of_model"]

_REGISTRY: dict[str, "ModelFamily"] = {}
F = TypeVar("F", bound=type)


def register_family(name: str) -> Callable[[F], F]:
    """Class decorator: register one instance of the decorated :class:`ModelFamily` as ``name`` (the
    value of ``model.family`` that selects it). A name registers once."""

    def register(cls: F) -> F:
        if not (isinstance(cls, type) and issubclass(cls, ModelFamily)):
            raise TypeError(f"register_family({name!r}): {cls!r} is not a ModelFamily subclass")
        if name in _REGISTRY:
            raise ValueError(f"model family {name!r} is registered twice ({type(_REGISTRY[name]).__name__}, "
                             f"{cls.__name__})")
        cls.name = name
        _REGISTRY[name] = cls()
        return cls

    return register


def family_names() -> tuple[str, ...]:
    """The registered families' names, in registration order."""
    return tuple(_REGISTRY)


def family_of(config: FlowRLConfig | str) -> "ModelFamily":
    """The family ``config.model.family`` (or the name given) selects; a ConfigError naming
    ``model.family`` when none is registered under it."""
    name = config if isinstance(config, str) else config.model.family
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ConfigError(f"model.family: {name!r} is not a registered model family "
                          f"(one of {', '.join(_REGISTRY)})") from None


def family_of_model(model: FlowModel) -> "ModelFamily":
    """The family whose adapter class ``model`` is (TypeError when none is)."""
    for family in _REGISTRY.values():
        if family.owns(model):
            return family
    raise TypeError(f"{type(model).__name__} is the model of no registered family ({', '.join(_REGISTRY)})")


def save_referencing_policy(model: FlowModel, network: torch.nn.Module, directory: Path, base_dir: Path | None) -> None:
    """A model artifact of a family built on published weights: the base artifact's reference to them, and
    the trained ``network`` (diffusers ``save_pretrained``, safetensors) beside it."""
    if base_dir is None or not (Path(base_dir) / QWEN_REFERENCE).is_file():
        raise CheckpointError(f"saving a {type(model).__name__} needs the base artifact's {QWEN_REFERENCE}")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / QWEN_REFERENCE).write_bytes((Path(base_dir) / QWEN_REFERENCE).read_bytes())
    network.save_pretrained(str(directory / QWEN_TRANSFORMER), safe_serialization=True)


class ModelFamily(abc.ABC):
    """One model family. Subclasses implement every method; the class attributes are documented in the
    module docstring."""

    name: str = ""
    has_judge: bool = False
    #: one model serves both tasks (load_task_views gives the same object twice), so a teacher of either
    #: task sits behind the same view
    one_model_for_tasks: bool = False
    from_pretrained: bool = False
    prompt_files: bool = False
    model_keys: bool = False
    #: the import path of the reward server's composite factory (flowrl/rewards/server.py): one for every
    #: family, which builds the config's reward components (flowrl/rewards/registry.py)
    reward_factory: str = "flowrl.rewards.registry:served_composite"

    # ------------------------------------------------------------------ the model and its network

    @abc.abstractmethod
    def owns(self, model: FlowModel) -> bool:
        """Whether ``model`` is this family's adapter."""

    @abc.abstractmethod
    def trainable_module(self, model: FlowModel) -> torch.nn.Module:
        """The network RL trains."""

    def with_trainable(self, model: FlowModel, module: torch.nn.Module) -> FlowModel:
        """The same model (its frozen parts shared, not copied) around another trainable network: a
        reference policy, a teacher, an adapter view, trained weights."""
        return model.with_trainable(module)

    # ------------------------------------------------------------------ model artifacts

    @abc.abstractmethod
    def load_policy(self, directory: Path, config: FlowRLConfig, task: str) -> FlowModel:
        """The model of a model artifact, set up for ``task`` (see :func:`flowrl.models.load_policy`)."""

    @abc.abstractmethod
    def check_policy(self, directory: Path, config: FlowRLConfig) -> None:
        """Fail now, without building the model, where :meth:`load_policy` of either task would fail."""

    @abc.abstractmethod
    def trained_state(self, directory: Path, config: FlowRLConfig, task: str) -> dict[str, torch.Tensor]:
        """The trainable network's weights of a model artifact, on the CPU."""

    @abc.abstractmethod
    def save_policy(self, model: FlowModel, directory: Path, base_dir: Path | None) -> None:
        """Write ``model`` as a model artifact :meth:`load_policy` reads."""

    @abc.abstractmethod
    def load_task_views(self, directory: Path, config: FlowRLConfig) -> dict[str, FlowModel]:
        """{"t2i": model, "edit": model} around one trainable network."""

    @abc.abstractmethod
    def load_frozen_network(self, directory: Path, config: FlowRLConfig, task: str) -> torch.nn.Module:
        """A model artifact's trainable network alone (not yet placed or frozen)."""

    # ------------------------------------------------------------------ published weights (from_pretrained)

    def pretrained_sources(self, config: FlowRLConfig) -> dict[str, tuple[str, str]]:
        """{task: (config key, weights directory or hub id)} of the published weights the base stage of a
        ``from_pretrained`` family validates and references; none for a family the base stage pretrains."""
        return {}

    def validate_pretrained(self, path: str, task: str) -> dict[str, Any]:
        """A summary of a local weights directory for ``task`` (its components), read without loading the
        weights; FileNotFoundError / ValueError naming what is wrong."""
        raise ValueError(f"model family {self.name!r} names no published weights to validate")

    # ------------------------------------------------------------------ facts the stages ask for

    @abc.abstractmethod
    def input_stamps(self, config: FlowRLConfig) -> dict[str, str]:
        """{config key: fingerprint} of local weights the config names (the base stage's cache key)."""

    @abc.abstractmethod
    def model_key(self, config: FlowRLConfig) -> dict[str, str]:
        """The inputs a stage's version takes from the model section when its artifacts do not carry it."""

    @abc.abstractmethod
    def image_size(self, config: FlowRLConfig) -> tuple[int, int]:
        """(height, width) of the images the model makes."""

    @abc.abstractmethod
    def reward_request_images(self, config: FlowRLConfig) -> int:
        """Images per request to a reward server."""

    @abc.abstractmethod
    def reward_server_kwargs(self, prompts_uri: Any, spread: bool) -> dict[str, Any]:
        """The keyword arguments the reward factory takes beyond config, reward model and task; ``spread``:
        the server has GPUs of its own to spread the scorers over."""

    # ------------------------------------------------------------------ config and planner

    @abc.abstractmethod
    def check_config(self, config: FlowRLConfig) -> None:
        """The family's own config rules (part of :func:`flowrl.config.check_consistency`)."""

    @abc.abstractmethod
    def memory_setting(self, config: FlowRLConfig) -> dict[str, Any]:
        """The family's fields of the planner's configured :class:`~flowrl.planner.Setting`."""

    @abc.abstractmethod
    def planner_figures(self, config: FlowRLConfig, per_rank: int, opd_rows: int) -> tuple[dict, dict, dict]:
        """(common, grpo, opd): the :class:`~flowrl.planner.Workload` fields of the network, tokens and
        frozen components both training stages share, and those of each stage alone."""


@register_family("shapes")
class ShapesFamily(ModelFamily):
    """The shapes world's small pixel-space DiT (flowrl/models/shapes_dit.py), pretrained by the base stage."""

    has_judge = True
    one_model_for_tasks = True

    def owns(self, model):
        from flowrl.models.shapes_dit import ShapesFlowModel

        return isinstance(model, ShapesFlowModel)

    def trainable_module(self, model):
        return model.net

    def load_policy(self, directory, config, task):
        return load_checkpoint(directory, expected_family="shapes", cfg_renorm=config.sampler.cfg_renorm)

    def check_policy(self, directory, config):
        self.load_policy(directory, config, "t2i")

    def trained_state(self, directory, config, task):
        return self.trainable_module(self.load_policy(directory, config, task)).state_dict()

    def save_policy(self, model, directory, base_dir):
        save_checkpoint(model, directory)

    def load_task_views(self, directory, config):
        model = self.load_policy(directory, config, "t2i")
        return {"t2i": model, "edit": model}  # one model serves both tasks

    def load_frozen_network(self, directory, config, task):
        return self.trainable_module(self.load_policy(directory, config, task))

    def input_stamps(self, config):
        return {}

    def model_key(self, config):
        return {}  # a shapes checkpoint carries its model

    def image_size(self, config):
        return (config.world.resolution, config.world.resolution)

    def reward_request_images(self, config):
        return config.grpo.prompts_per_iteration * config.grpo.group_size  # a whole submission: small images

    def reward_server_kwargs(self, prompts_uri, spread):
        return {}

    def check_config(self, config):
        return None

    def memory_setting(self, config):
        return {"lora_rank": 0, "text_encoder_device": "same", "decode_batch": None, "monitor_batch": None}

    def planner_figures(self, config, per_rank, opd_rows):
        from flowrl.models import create_model
        from flowrl.planner import network_of

        net = network_of(create_model(config).net)
        s = config.model.shapes
        image, text = 2 * (config.world.resolution // s.patch) ** 2, 16  # target + source patches, the prompt
        return dict(network=net, dtype="float32", image_tokens=image, text_tokens=text), {}, {}


@register_family("qwen_image")
class QwenImageFamily(ModelFamily):
    """Qwen-Image (T2I) and Qwen-Image-Edit from published diffusers weights (flowrl/models/qwen_image.py):
    the base stage references them, RL trains the transformer (or LoRA adapters on it)."""

    from_pretrained = True
    prompt_files = True
    model_keys = True

    def owns(self, model):
        from flowrl.models.qwen_image import QwenImageModel

        return isinstance(model, QwenImageModel)

    def trainable_module(self, model):
        return model.transformer

    def _pipeline(self, path: str, task: str, config: FlowRLConfig, transformer, **shared):
        from flowrl.models.qwen_image import QwenImageModel

        q = config.model.qwen_image
        return QwenImageModel.from_pretrained(path, task=task, dtype=_DTYPES[q.dtype], device=local_device(),
                                              height=q.height, width=q.width, transformer=transformer,
                                              decode_batch=q.decode_batch, **shared)

    def load_policy(self, directory, config, task):
        path = pretrained_path(directory, task)
        # a trained artifact's transformer replaces the pretrained one, which is then never loaded
        trained = _artifact_transformer(directory, config) if (directory / QWEN_TRANSFORMER).is_dir() else None
        return self._pipeline(path, task, config, trained)

    def pretrained_sources(self, config):
        q = config.model.qwen_image
        edit_key = "edit_pretrained" if q.edit_pretrained else "pretrained"
        return {"t2i": ("model.qwen_image.pretrained", q.pretrained),
                "edit": (f"model.qwen_image.{edit_key}", getattr(q, edit_key))}

    def validate_pretrained(self, path, task):
        from flowrl.models.qwen_image import validate_pretrained

        return validate_pretrained(path, task=task)

    def check_policy(self, directory, config):
        for task in ("t2i", "edit"):
            pretrained_path(directory, task)
        if (directory / QWEN_TRANSFORMER).is_dir() and not (directory / QWEN_TRANSFORMER / "config.json").is_file():
            raise CheckpointError(f"{directory / QWEN_TRANSFORMER}: no config.json (not a saved transformer)")

    def trained_state(self, directory, config, task):
        import json

        if (directory / QWEN_TRANSFORMER).is_dir():
            return _artifact_transformer(directory, config).state_dict()
        from diffusers import QwenImageTransformer2DModel

        from flowrl.weights import local_weights

        reference = json.loads((directory / QWEN_REFERENCE).read_text())
        path = local_weights(reference["pretrained"][task], f"{directory / QWEN_REFERENCE}: pretrained.{task}")
        return QwenImageTransformer2DModel.from_pretrained(
            path, subfolder="transformer", torch_dtype=_DTYPES[config.model.qwen_image.dtype]).state_dict()

    def save_policy(self, model, directory, base_dir):
        save_referencing_policy(model, self.trainable_module(model), directory, base_dir)

    def load_task_views(self, directory, config):
        from flowrl.models.qwen_image import same_component

        t2i = self.load_policy(directory, config, "t2i")
        t2i_path, edit_path = pretrained_path(directory, "t2i"), pretrained_path(directory, "edit")
        shared = {name: getattr(t2i, name) for name in ("vae", "text_encoder", "tokenizer")
                  if same_component(t2i_path, edit_path, name)}
        return {"t2i": t2i, "edit": self._pipeline(edit_path, "edit", config, t2i.transformer, **shared)}

    def load_frozen_network(self, directory, config, task):
        if not (directory / QWEN_TRANSFORMER).is_dir():
            raise CheckpointError(f"{directory}: no trained {QWEN_TRANSFORMER}/ (not a GRPO or OPD artifact)")
        return _artifact_transformer(directory, config)

    def input_stamps(self, config):
        from flowrl.models.qwen_image import weights_fingerprint

        q = config.model.qwen_image
        paths = {"model.qwen_image.pretrained": q.pretrained, "model.qwen_image.edit_pretrained": q.edit_pretrained}
        local = {key: Path(p).expanduser() for key, p in paths.items() if p}
        return {key: weights_fingerprint(p) for key, p in local.items() if p.is_dir()}

    def model_key(self, config):
        # the model section (pretrained weights, LoRA, dtype, size) shapes what a stage makes of a model
        # artifact, which records only the weights it builds on
        return {"model": config.section_hash("model")}

    def image_size(self, config):
        return (config.model.qwen_image.height, config.model.qwen_image.width)

    def reward_request_images(self, config):
        # one prompt group of 1024 x 1024 images, so a request body stays in the tens of MB the server accepts
        return config.grpo.group_size

    def reward_server_kwargs(self, prompts_uri, spread):
        return {"prompts_uri": prompts_uri, **({"spread": True} if spread else {})}

    def check_config(self, config):
        from flowrl.config import _check_lora, pillar_sources

        q = config.model.qwen_image
        if not q.pretrained:
            raise ConfigError("model.qwen_image.pretrained: required when model.family is qwen_image")
        if config.reward_model.backbone != "vlm":
            raise ConfigError("reward_model.backbone: the qwen_image family scores with the vlm backbone")
        for key in ("height", "width"):
            if getattr(q, key) % 16:
                raise ConfigError(f"model.qwen_image.{key}: expected a multiple of 16, got {getattr(q, key)}")
        for task in ("t2i", "edit"):
            if not getattr(config.filter, f"{task}_prompts"):
                raise ConfigError(f"filter.{task}_prompts: required when model.family is qwen_image (the {task} "
                                  "candidate prompt file, see flowrl/prompt_files.py)")
        if config.bench.scorer != "reward_models":
            raise ConfigError("bench.scorer: qwen_image has no judge; set it to reward_models")
        for task in ("t2i", "edit"):
            if not getattr(config.bench, f"{task}_prompts"):
                raise ConfigError(f"bench.{task}_prompts: required when model.family is qwen_image (the {task} "
                                  "bench prompt file, unseen by every training stage)")
        pillar_sources(config.bench.scorers)
        if not config.grpo.monitor_reward:
            raise ConfigError("grpo.monitor_reward: required when model.family is qwen_image (there is no judge: name "
                              "the held-out reward model that watches for hacking, e.g. pairwise)")
        _check_lora(config)

    def memory_setting(self, config):
        q = config.model.qwen_image
        return {"lora_rank": q.lora.rank if q.lora is not None else 0,
                "text_encoder_device": getattr(q, "text_encoder_device", "same"),
                "decode_batch": getattr(q, "decode_batch", None), "monitor_batch": config.eval.batch_size}

    def planner_figures(self, config, per_rank, opd_rows):
        from flowrl.planner import qwen_image_figures

        return qwen_image_figures(config, per_rank, opd_rows)


import flowrl.models.sd3  # noqa: E402,F401  (registers the sd3 family)
