"""Which fault of the judge's fidelity does a T2I policy drift into, and do the reward models see it?

Not a test: it measures, it does not assert. For the base and each given policy
(a grpo artifact or a trainer checkpoint directory, both holding
``model.safetensors``) this samples the held-out T2I set with the deployment
sampler and reports the judge's fidelity with its four error terms (each as
error / scale, what it takes off log fidelity: background, colour, strays,
shapes), and the mean of each component of each given reward model. Over all
the images it then reports how each reward component ranks them against each
judge term (Spearman correlation of the reward with minus the error; null where
either is constant): a reward that cannot rank a fault cannot hold a policy
back from drifting into it. Run from the repository root:

    .venv/bin/python -m experiments.fidelity_probe.fidelity_probe --base artifacts/base/<version> \\
        --policy it800=artifacts/grpo_t2i.checkpoints/<version>-0000800 \\
        --reward-model shipped=artifacts/reward_model/<version> \\
        --output experiments/fidelity_probe/results/fidelity_probe.json
"""

from __future__ import annotations

import argparse
import copy
import json

import numpy as np
import torch
from safetensors.torch import load_file
from scipy.stats import spearmanr

from experiments import provenance, write_result
from flowrl.config import load_config, name_value_pairs
from flowrl.evaluation import generate, heldout_sets, item_seeds, to_uint8
from flowrl.models import load_policy, set_torch_threads, trainable_module
from flowrl.rewards.shapes_rewards import load_shapes_rewards
from flowrl.shapes.detect import read_images
from flowrl.shapes.judge import FIDELITY_SCALES, FidelityTerms, fidelity_terms_of
from flowrl.storage import fetch


def term_errors(terms: list[FidelityTerms]) -> dict[str, np.ndarray]:
    """Per judge term, each image's error / scale (its share of minus log fidelity)."""
    return {name: np.array([getattr(t, name) / scale for t in terms]) for name, scale in FIDELITY_SCALES.items()}


def rank_agreement(scores: dict[str, np.ndarray], errors: dict[str, np.ndarray]) -> dict[str, dict]:
    """Spearman correlation of each score with minus each error over the same images; None where either
    is constant (no ranking to agree with)."""
    out = {}
    for name, score in scores.items():
        row = {}
        for term, error in errors.items():
            if np.ptp(score) == 0 or np.ptp(error) == 0:
                row[term] = None
            else:
                row[term] = round(float(spearmanr(score, -error).statistic), 3)
        out[name] = row
    return out


@torch.no_grad()
def probe(config_path: str, base: str, policies: list[tuple[str, str]], reward_models: list[tuple[str, str]],
          threads: int | None = None) -> dict:
    config = load_config(config_path)
    set_torch_threads(threads if threads is not None else config.run.torch_threads)
    base_model = load_policy(base, config, "t2i")
    rewards = {name: load_shapes_rewards(config, uri)["t2i"] for name, uri in reward_models}
    t2i_set, _ = heldout_sets(config)
    prompts = [e.prompt for e in t2i_set]
    seeds, _ = item_seeds(config.eval.seed, len(t2i_set))  # the judge's own held-out seeds
    models, all_errors, all_scores = {}, [], {}
    for name, path in [("base", None), *policies]:
        model = base_model
        if path is not None:
            model = copy.deepcopy(base_model)
            trainable_module(model).load_state_dict(load_file(fetch(path) / "model.safetensors"))
        images = generate(model, prompts, seeds, config.sampler, batch_size=config.eval.batch_size)
        terms = [fidelity_terms_of(r) for r in read_images(to_uint8(images))]
        errors = term_errors(terms)
        entry = {"fidelity": round(float(np.mean([t.score for t in terms])), 4),
                 "terms": {k: round(float(v.mean()), 4) for k, v in errors.items()}, "rewards": {}}
        for reward_name, reward in rewards.items():
            components = reward.score_components(images, prompts).components
            for component, value in components.items():
                key = f"{reward_name}/{component}"
                entry["rewards"][key] = round(float(value.mean()), 4)
                all_scores.setdefault(key, []).append(value.numpy())
        all_errors.append(errors)
        models[name] = entry
        print(name, json.dumps(entry), flush=True)
    errors = {term: np.concatenate([e[term] for e in all_errors]) for term in FIDELITY_SCALES}
    scores = {key: np.concatenate(parts) for key, parts in all_scores.items()}
    return {"models": models, "rank_agreement": rank_agreement(scores, errors), "images_per_model": len(prompts)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/shapes.yaml")
    parser.add_argument("--base", required=True, help="the base stage's artifact")
    parser.add_argument("--policy", action="append", default=[], metavar="NAME=PATH",
                        help="a grpo artifact or checkpoint directory; repeat per policy")
    parser.add_argument("--reward-model", action="append", required=True, metavar="NAME=URI",
                        help="a reward_model stage's artifact; repeat per reward model")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: run.torch_threads)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    policies = name_value_pairs(tuple(args.policy), "--policy", "NAME=PATH")
    reward_models = name_value_pairs(tuple(args.reward_model), "--reward-model", "NAME=URI")
    result = {
        **probe(args.config, args.base, policies, reward_models, args.threads),
        "inputs": {"base": args.base, "policies": dict(policies), "reward_models": dict(reward_models)},
        **provenance("experiments.fidelity_probe.fidelity_probe", argv),
    }
    if args.output:
        write_result(args.output, result)
    return result


if __name__ == "__main__":
    main()
