"""Benchmark of GRPO's two costs: rollouts and the policy update.

Not a test: it measures, it does not assert. Run from the repository root:

    .venv/bin/python -m bench.grpo --output results/grpo_bench.json

* rollouts: images/s of flowrl's sampler (batched CFG: cond and uncond in one
  forward; SDE step with log-probs) vs a loop in the style of a diffusers
  pipeline over the same model: per step a conditional and an unconditional
  forward, CFG, then ``FlowMatchEulerDiscreteScheduler.step``. Both run the
  same schedule and guidance; the diffusers loop computes no log-probs (its
  scheduler has no SDE step), so the comparison favours it.
* update: seconds of forward + backward for K trained steps per trajectory vs
  all N, on the same rollouts (the cost the timestep subset saves).

The model is the shapes world's base architecture (configs/shapes.yaml),
randomly initialised: speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from flowrl.machine import machine_info
from flowrl.config import load_config
from flowrl.models import create_model
from flowrl.rl.objectives import ppo_clip_loss
from flowrl.rl.rollout import RolloutSettings, rollout, select_timesteps, step_log_probs
from flowrl.sampling import guided_velocity
from flowrl.shapes.prompts import make_t2i_set

ROOT = Path(__file__).resolve().parents[1]


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


@torch.no_grad()
def diffusers_loop(model, prompts: list[str], num_steps: int, scale: float, generator: torch.Generator) -> torch.Tensor:
    scheduler = FlowMatchEulerDiscreteScheduler()
    sigmas = torch.linspace(1.0, 1.0 / num_steps, num_steps).numpy()
    scheduler.set_timesteps(sigmas=sigmas)
    cond = model.encode_prompts(prompts)
    null = model.null_condition(cond)
    x = model.prepare_noise(len(prompts), generator)
    for t in scheduler.timesteps:
        tt = torch.full((len(prompts),), float(t) / scheduler.config.num_train_timesteps)
        v_c = model.velocity(x, tt, cond)
        v_u = model.velocity(x, tt, null)
        x = scheduler.step(guided_velocity(v_c, v_u, scale), t, x, return_dict=False)[0]
    return model.decode_latents(x)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default=None, help="write the JSON result here")
    parser.add_argument("--config", default=str(ROOT / "configs" / "shapes.yaml"))
    parser.add_argument("--batch", type=int, default=64, help="trajectories per rollout batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    g, r = config.grpo, config.grpo.rollout
    model = create_model(config, seed=0)
    prompts = [e.prompt for e in make_t2i_set(0, 20)][: args.batch // g.group_size]
    settings = RolloutSettings(r.num_steps, r.noise_level, r.guidance_scale, "hybrid")
    gen = torch.Generator().manual_seed(0)
    ours = _timed(lambda: rollout(model, prompts, g.group_size, settings, gen), args.repeats)
    rows = [p for p in prompts for _ in range(g.group_size)]
    theirs = _timed(lambda: diffusers_loop(model, rows, r.num_steps, r.guidance_scale, gen), args.repeats)
    n_images = len(rows)

    ro = rollout(model, prompts, g.group_size, settings, gen)
    adv = torch.randn(ro.batch_size, generator=gen)

    def update(mode: str) -> None:
        steps = select_timesteps(ro.batch_size, r.num_steps, mode, g.timesteps.fraction, g.timesteps.per_trajectory,
                                 gen, start=g.timesteps.start)
        rows_idx = torch.arange(ro.batch_size)
        new = step_log_probs(model, ro, rows_idx, steps, settings)
        loss, _ = ppo_clip_loss(new.log_probs, ro.old_log_probs[rows_idx[:, None], steps], adv, g.clip_range)
        loss.backward()
        model.net.zero_grad(set_to_none=True)

    subset_s = _timed(lambda: update("subset"), args.repeats)
    all_s = _timed(lambda: update("all"), args.repeats)
    result = {
        "rollout": {
            "images": n_images, "num_steps": r.num_steps, "guidance_scale": r.guidance_scale,
            "flowrl_images_per_s": n_images / ours, "diffusers_loop_images_per_s": n_images / theirs,
            "speedup": theirs / ours,
        },
        "update": {
            "trajectories": ro.batch_size, "k": g.timesteps.per_trajectory, "n": r.num_steps,
            "subset_s": subset_s, "all_s": all_s, "all_over_subset": all_s / subset_s,
        },
        "machine": {**machine_info(), "threads": args.threads},
    }
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
