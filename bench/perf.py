"""How close flowrl runs to this machine's limits: results/perf.json.

Not a test: it measures, it does not assert. Run from the repository root:

    .venv/bin/python -m bench.perf --output results/perf.json                          # part micro
    .venv/bin/python -m bench.perf --output results/perf.json --parts micro,run,tests  # about an hour

Absolute times differ between machines, so the file holds ratios measured side
by side in one process, one right after the other. Each part merges its keys
into the file (the others' keys stay) and records the machine, the threads,
the commit (and whether the tree had uncommitted changes) and the date.

* ``micro`` (minutes): the fp32 matmul peak (GFLOP/s, best of a few square
  sizes); rollout images/s of flowrl's SDE sampler with log-probs against a
  diffusers loop on the same weights, for the shapes model (a hand loop as
  diffusers' pipelines run it: a conditional and an unconditional forward per
  step, then ``FlowMatchEulerDiscreteScheduler.step``; see bench/grpo.py) and
  for a tiny random Qwen-Image transformer (diffusers' own
  ``QwenImagePipeline.__call__``); model FLOPs per second of rollout and of the
  GRPO update as a share of the peak (FLOPs counted once by torch's
  ``FlopCounterMode``, time measured without it); the update with K of N
  timesteps against all N; and one GRPO iteration of the real trainer scored
  through the real reward server and client with 200 ms injected per request,
  over the same without delay.
* ``run`` (about 45 minutes on configs/shapes.yaml): a cold run of the pipeline
  in a scratch directory (its own artifact root, MLflow store and Flyte cache),
  each stage's wall time from MLflow, the peak resident memory of the process
  tree, then a second run with nothing changed.
* ``tests``: the wall time of the test suite as ``make test`` runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("micro", "run", "tests")
REWARD_SPEC = "tests.rewards.fake_rewards:conv_net"  # a small fixed conv net: real compute, no trained weights


# --------------------------------------------------------------------------- the results file


def git_state(root: Path = ROOT) -> dict[str, object]:
    """The checkout's commit and whether it has uncommitted changes (None where git cannot tell)."""

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit.strip() if commit else None, "dirty": None if status is None else bool(status.strip())}


def merge_into(path: Path, updates: dict) -> dict:
    """``updates`` merged over the JSON object in ``path`` (if there is one), written atomically:
    a temporary file in the same directory, then renamed over ``path``. Returns the merged object."""
    data: dict = {}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON ({exc}); move it away or fix it before merging") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path}: holds a JSON {type(data).__name__}, not an object")
    data.update(updates)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a results file is for everyone to read
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return data


def provenance(threads: int) -> dict[str, object]:
    """Where and when a part was measured."""
    from flowrl.machine import machine_info

    return {
        "machine": machine_info(),
        "threads": threads,
        "git": git_state(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


def relative(path: str | Path) -> str:
    """``path`` relative to the repository where it lies inside it, else as given."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(ROOT))
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------- timing and FLOPs


def best_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """The fastest of ``repeats`` calls of each function, after one warm-up call each; the functions
    take turns, so a change of load on a shared machine falls on all of them alike."""
    for fn in fns.values():
        fn()
    best = {name: math.inf for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def counted_flops(fn: Callable[[], object]) -> int:
    """Model FLOPs of one call of ``fn`` (matmuls, convolutions and attention, forward and backward),
    as torch's ``FlopCounterMode`` counts them."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    # the counter has no formula for the CPU flash-attention kernel: counted through the math backend,
    # attention shows up as the matmuls it is
    with sdpa_kernel(SDPBackend.MATH), counter:
        fn()
    return int(counter.get_total_flops())


def matmul_peak_gflops(sizes: list[int], min_s: float = 0.5) -> dict[str, object]:
    """fp32 GFLOP/s of square matmuls, the best over ``sizes`` (each run for at least ``min_s``)."""
    import torch

    rates = {}
    generator = torch.Generator().manual_seed(0)
    for n in sizes:
        a, b = torch.randn(n, n, generator=generator), torch.randn(n, n, generator=generator)
        out = torch.empty(n, n)
        torch.mm(a, b, out=out)  # warm-up
        calls, start = 0, time.perf_counter()
        while calls < 3 or time.perf_counter() - start < min_s:
            torch.mm(a, b, out=out)
            calls += 1
        rates[str(n)] = 2 * n**3 * calls / (time.perf_counter() - start) / 1e9
    return {"matmul_peak_gflops": max(rates.values()), "matmul_gflops_by_size": rates}


# --------------------------------------------------------------------------- part micro


def shapes_rollout(config, args, peak: float) -> dict[str, object]:
    """flowrl's rollout (SDE, log-probs, hybrid CFG) against bench/grpo.py's diffusers-style loop."""
    import torch

    from bench.grpo import diffusers_loop
    from flowrl.models import create_model
    from flowrl.rl.grpo import settings_of
    from flowrl.rl.rollout import rollout
    from flowrl.shapes.prompts import make_t2i_set

    g, r = config.grpo, config.grpo.rollout
    model = create_model(config, seed=0)
    prompts = shapes_prompts(make_t2i_set, max(1, args.batch // g.group_size))[0]
    rows = [p for p in prompts for _ in range(g.group_size)]
    settings = settings_of(g)
    gen = torch.Generator().manual_seed(0)
    times = best_times({
        "flowrl": lambda: rollout(model, prompts, g.group_size, settings, gen),
        "diffusers": lambda: diffusers_loop(model, rows, r.num_steps, r.guidance_scale, gen),
    }, args.repeats)
    flops = counted_flops(lambda: rollout(model, prompts, g.group_size, settings, gen))
    return {
        "rollout_vs_diffusers": times["diffusers"] / times["flowrl"],
        "flowrl_images_per_s": len(rows) / times["flowrl"],
        "diffusers_images_per_s": len(rows) / times["diffusers"],
        "rollout_gflop": flops / 1e9,
        "rollout_peak_fraction": flops / times["flowrl"] / (peak * 1e9),
        "images": len(rows), "num_steps": r.num_steps, "guidance_scale": r.guidance_scale,
        "noise_level": r.noise_level, "cfg_mode": r.cfg_mode,
        "note": "diffusers side: a hand loop over the same model as diffusers' pipelines run it (separate cond and "
                "uncond forwards, guided_velocity, FlowMatchEulerDiscreteScheduler.step), no log-probs; flowrl "
                "side: flowrl.rl.rollout.rollout with grpo.rollout's settings, log-probs included",
    }


def shapes_prompts(make_t2i_set, count: int) -> tuple[list[str], list[str]]:
    """``count`` shapes prompts and their categories, the categories taking turns."""
    examples = make_t2i_set(0, count)
    by_category: dict[str, list] = {}
    for example in examples:
        by_category.setdefault(example.spec.category, []).append(example)
    chosen = [e for group in zip(*by_category.values()) for e in group][:count]
    return [e.prompt for e in chosen], [e.spec.category for e in chosen]


def _natural(embeds, mask):
    """Trim padding the whole batch shares; the mask None when every token is valid, as diffusers'
    ``encode_prompt`` returns them."""
    length = int(mask.sum(dim=1).max())
    embeds, mask = embeds[:, :length], mask[:, :length]
    return embeds, (None if mask.all() else mask)


def qwen_image_rollout(args, peak: float) -> dict[str, object]:
    """flowrl's rollout on a tiny random Qwen-Image against diffusers' ``QwenImagePipeline.__call__``
    over the very same modules, with the prompt embeddings flowrl makes."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    from flowrl.models.qwen_image import QwenImageModel
    from flowrl.rl.rollout import RolloutSettings, rollout
    from tests.models.tiny_qwen_image import build_tiny_qwen_image

    size, batch, steps, scale = args.qwen_size, args.qwen_batch, args.qwen_steps, args.qwen_cfg
    prompts = ["a red circle left of a blue square", "two green triangles above a yellow circle",
               "a purple square below an orange triangle", "three blue circles"]
    prompts = [prompts[i % len(prompts)] for i in range(batch)]
    with tempfile.TemporaryDirectory(prefix="flowrl-perf-qwen-") as tmp:
        tiny = build_tiny_qwen_image(Path(tmp) / "tiny", task="t2i")
        model = QwenImageModel.from_pretrained(tiny, task="t2i", height=size, width=size)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny, subfolder="scheduler")
    pipe = QwenImagePipeline(scheduler=scheduler, vae=model.vae, text_encoder=model.text_encoder,
                             tokenizer=model.tokenizer, transformer=model.transformer)
    pipe.set_progress_bar_config(disable=True)
    settings = RolloutSettings(steps, args.qwen_noise_level, scale, "hybrid")
    with torch.no_grad():
        cond = model.encode_prompts(prompts)
        null = model.null_condition(cond)
    embeds, mask = _natural(cond.tensors["prompt_embeds"], cond.tensors["prompt_mask"])
    negative, negative_mask = _natural(null.tensors["prompt_embeds"], null.tensors["prompt_mask"])
    gen = torch.Generator().manual_seed(0)

    def ours():
        return rollout(model, prompts, 1, settings, gen)

    def theirs():
        return pipe(height=size, width=size, num_inference_steps=steps, generator=gen, output_type="pt",
                    prompt_embeds=embeds, prompt_embeds_mask=mask, negative_prompt_embeds=negative,
                    negative_prompt_embeds_mask=negative_mask, true_cfg_scale=scale).images

    times = best_times({"flowrl": ours, "diffusers": theirs}, args.repeats)
    flops = counted_flops(ours)
    return {
        "rollout_vs_diffusers": times["diffusers"] / times["flowrl"],
        "flowrl_images_per_s": batch / times["flowrl"],
        "diffusers_images_per_s": batch / times["diffusers"],
        "rollout_gflop": flops / 1e9,
        "rollout_peak_fraction": flops / times["flowrl"] / (peak * 1e9),
        "images": batch, "image_size": size, "num_steps": steps, "true_cfg_scale": scale,
        "noise_level": args.qwen_noise_level, "transformer_layers": 2,
        "note": "flowrl side: flowrl.rl.rollout.rollout (SDE step with log-probs, batched CFG, the text encoder run "
                "on every call, VAE decode); diffusers side: QwenImagePipeline.__call__ on the same transformer, "
                "VAE and scheduler config (deterministic Euler step, no log-probs, true CFG as two forwards, "
                "output_type='pt' so it decodes too) given flowrl's prompt embeddings computed once, outside the "
                "timing: both favour the pipeline",
    }


def grpo_update(config, args, peak: float) -> dict[str, object]:
    """FLOPs per second of the GRPO update (forward + backward of step_log_probs and the PPO-clip loss on
    K of N steps) over the matmul peak, and the update's time with K of N steps against all N."""
    import torch

    from flowrl.models import create_model
    from flowrl.rl.grpo import settings_of
    from flowrl.rl.objectives import ppo_clip_loss
    from flowrl.rl.rollout import rollout, select_timesteps, step_log_probs
    from flowrl.shapes.prompts import make_t2i_set

    g, r, ts = config.grpo, config.grpo.rollout, config.grpo.timesteps
    model = create_model(config, seed=0)
    settings = settings_of(g)
    gen = torch.Generator().manual_seed(0)
    prompts = shapes_prompts(make_t2i_set, max(1, args.batch // g.group_size))[0]
    ro = rollout(model, prompts, g.group_size, settings, gen)
    adv = torch.randn(ro.batch_size, generator=gen)
    rows = torch.arange(ro.batch_size)

    def update(mode: str) -> None:
        steps = select_timesteps(ro.batch_size, r.num_steps, mode, ts.fraction, ts.per_trajectory, gen,
                                 start=ts.start)
        new = step_log_probs(model, ro, rows, steps, settings)
        loss, _ = ppo_clip_loss(new.log_probs, ro.old_log_probs[rows[:, None], steps], adv, g.clip_range)
        loss.backward()
        model.net.zero_grad(set_to_none=True)

    times = best_times({"subset": lambda: update("subset"), "all": lambda: update("all")}, args.repeats)
    flops = counted_flops(lambda: update("subset"))
    return {
        "update_peak_fraction": flops / times["subset"] / (peak * 1e9),
        "update": {"trajectories": ro.batch_size, "gflop": flops / 1e9, "seconds": times["subset"],
                   "gflops": flops / times["subset"] / 1e9,
                   "note": "forward + backward of step_log_probs and ppo_clip_loss on K of N steps; no KL term"},
        "update_k_over_n": {"k": ts.per_trajectory, "n": r.num_steps, "subset_s": times["subset"],
                            "all_s": times["all"], "all_over_subset": times["all"] / times["subset"]},
    }


def reward_latency(config, args) -> dict[str, object]:
    """One GRPO iteration of the real trainer (chunked rollouts, each chunk submitted to the reward server
    while the next is sampled, then the update) scored through the real server and client: with
    ``args.reward_delay_s`` injected per request over the same with none."""
    import torch

    from flowrl.models import create_model
    from flowrl.rewards.client import RewardClient
    from flowrl.rewards.server import free_port, launch_server
    from flowrl.rl.grpo import GRPOTrainer, PromptSet
    from flowrl.shapes.prompts import make_t2i_set

    # the pretraining mix (grpo.ptx_coef) adds the same work with or without reward latency: left out here
    g = dataclasses.replace(config.grpo, ptx_coef=0.0)
    prompts, categories = shapes_prompts(make_t2i_set, max(g.prompts_per_iteration, 4))
    prompt_set = PromptSet(prompts, categories, None)
    per_request = g.prompts_per_iteration * g.group_size  # what the shapes stage sends: a whole submission
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # as the stage starts its sidecar
    servers, clients, trainers = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="flowrl-perf-reward-") as logs:
        try:
            for name, delay in (("none", 0.0), ("delayed", args.reward_delay_s)):
                servers[name] = launch_server({"bench": REWARD_SPEC}, port=free_port(), delay_s=delay, env=env,
                                              log_path=Path(logs) / f"{name}.log", cwd=ROOT, max_batch=per_request)
            for name, server in servers.items():
                server.wait_until_healthy(timeout_s=120)
                clients[name] = RewardClient(server.base_url, "bench", timeout_s=g.reward_timeout_s,
                                             retries=g.reward_retries, max_batch=per_request,
                                             max_in_flight=g.reward_chunks)
                model = create_model(config, seed=0)
                reference = create_model(config, seed=0) if g.kl_coef > 0 else None
                trainers[name] = GRPOTrainer(model, model.net, reference, g, prompt_set, clients[name],
                                             weights=lambda rows: torch.ones(len(rows), 1))
            step = {name: iter(range(10**6)) for name in trainers}
            times = best_times({name: (lambda t=t, s=step[name]: t.step(next(s))) for name, t in trainers.items()},
                               args.reward_iterations)
        finally:
            for client in clients.values():
                client.close()
            for server in servers.values():
                server.stop()
    return {
        "reward_latency_ratio": times["delayed"] / times["none"],
        "reward_latency": {
            "iteration_s_no_delay": times["none"], "iteration_s_delayed": times["delayed"],
            "delay_s_per_request": args.reward_delay_s, "reward_chunks": g.reward_chunks,
            "requests_per_iteration": g.reward_chunks * math.ceil(g.prompts_per_iteration * g.group_size
                                                                  / g.reward_chunks / per_request),
            "note": "flowrl.rl.grpo.GRPOTrainer.step (grpo settings of the config, KL reference included) scored "
                    "through flowrl.rewards.server in its own process and RewardClient, as the GRPO stage plugs "
                    f"in a served reward; the served reward is the stand-in {REWARD_SPEC} (the shapes composite "
                    "needs a trained reward model); fastest iteration of each after a warm-up, taking turns",
        },
    }


def micro(args) -> dict[str, object]:
    import torch

    from flowrl.config import load_config

    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    out: dict[str, object] = matmul_peak_gflops(args.matmul_sizes)
    peak = out["matmul_peak_gflops"]
    out["shapes"] = shapes_rollout(config, args, peak)
    print(f"shapes rollout: {out['shapes']['rollout_vs_diffusers']:.2f}x", flush=True)
    if not args.skip_qwen:
        out["qwen_image_tiny"] = qwen_image_rollout(args, peak)
        print(f"qwen_image_tiny rollout: {out['qwen_image_tiny']['rollout_vs_diffusers']:.2f}x", flush=True)
    out.update(grpo_update(config, args, peak))
    print(f"update: {out['update_peak_fraction']:.3f} of the peak", flush=True)
    out.update(reward_latency(config, args))
    out["micro_config"] = relative(args.config)
    out["micro_provenance"] = provenance(args.threads)
    return out


# --------------------------------------------------------------------------- part run


class TreeRSS:
    """Samples the summed resident memory of a process and all its descendants every ``interval_s``
    in a background thread; ``peak_bytes`` is the largest sum seen."""

    def __init__(self, pid: int, interval_s: float = 0.5):
        self.pid, self.interval_s = pid, interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flowrl-perf-rss", daemon=True)

    def sample(self) -> int:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0
        total = 0
        for proc in procs:
            try:
                total += proc.memory_info().rss
            except psutil.Error:  # ended between the listing and the reading
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self.sample())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "TreeRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def stage_times(tracking_uri: str) -> dict[str, float]:
    """{stage: wall seconds} of the stage runs under the newest pipeline run in the MLflow store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              order_by=["attributes.start_time DESC"])
    parent = next((r for r in runs if r.data.tags.get("flowrl.stage") == "pipeline"), None)
    if parent is None:
        raise RuntimeError(f"no pipeline run in {tracking_uri}")
    return {r.data.tags["flowrl.stage"]: round((r.info.end_time - r.info.start_time) / 1000, 1)
            for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
            and r.info.end_time is not None and "flowrl.stage" in r.data.tags}


def timed_pipeline(config: Path, env: dict[str, str], log: Path) -> tuple[float, int]:
    """One run of the pipeline as `make run` starts it (pyflyte run pipelines/post_train.py post_train);
    (wall seconds, peak summed RSS of its process tree in bytes). Raises with the log's tail on failure."""
    pyflyte = str(Path(sys.executable).with_name("pyflyte"))
    command = [pyflyte, "run", "pipelines/post_train.py", "post_train", "--config", str(config)]
    start = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        with TreeRSS(proc.pid) as rss:
            code = proc.wait()
    wall = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"pipeline run failed ({code}); the end of {log}:\n"
                           + log.read_text(errors="replace")[-3000:])
    return wall, rss.peak_bytes


def pipeline_run(args) -> dict[str, object]:
    """A cold run of the pipeline in a scratch directory, then a second with nothing changed."""
    import yaml

    source = Path(args.config)
    data = yaml.safe_load(source.read_text())
    scratch = Path(tempfile.mkdtemp(prefix="flowrl-perf-run-"))
    data["run"]["artifact_root"] = str(scratch / "artifacts")
    data["run"]["tracking_uri"] = f"sqlite:///{scratch / 'mlflow.db'}"
    config = scratch / "config.yaml"
    config.write_text(yaml.safe_dump(data))
    # a fresh HOME: Flyte's local cache (~/.flyte) starts empty and the user's stays untouched
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HOME"] = str(scratch / "home")
    try:
        cold_s, cold_rss = timed_pipeline(config, env, scratch / "cold.log")
        stages = stage_times(data["run"]["tracking_uri"])
        print(f"cold run: {cold_s:.1f} s", flush=True)
        cached_s, cached_rss = timed_pipeline(config, env, scratch / "cached.log")
        print(f"cached run: {cached_s:.1f} s", flush=True)
    finally:
        if not args.keep_scratch:  # a failed run's artifacts do not stay behind in the temporary directory
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)
    children_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    peak = max(cold_rss, children_kib * 1024)
    return {
        "make_run_cold_s": round(cold_s, 1),
        "make_run_cached_s": round(cached_s, 1),
        "stages": stages,
        "dag_peak_rss_gib": peak / 2**30,
        "run_detail": {
            "config": relative(args.config),
            "tree_rss_peak_gib": cold_rss / 2**30, "tree_rss_peak_cached_gib": cached_rss / 2**30,
            "largest_child_maxrss_gib": children_kib / 2**20,
            "note": "the command `make run` runs (pyflyte run pipelines/post_train.py post_train), in a scratch "
                    "directory with its own artifact root, MLflow store and HOME (so an empty Flyte cache); "
                    "peak RSS: the larger of the process tree's summed RSS sampled every 0.5 s and "
                    "getrusage(RUSAGE_CHILDREN).ru_maxrss; stage times from the MLflow stage runs",
        },
        "run_provenance": provenance(args.threads),
    }


# --------------------------------------------------------------------------- part tests


def suite_command(workers: str, paths: list[str]) -> list[str]:
    """The pytest command of the Makefile's `test` target (``paths`` narrow it, for this script's own test)."""
    command = [sys.executable, "-m", "pytest", "-m", "not gpu", "-q"]
    if workers != "0":
        command += ["-n", workers, "--dist", "worksteal"]
    return command + paths


def test_suite(args) -> dict[str, object]:
    command = suite_command(args.test_workers, args.test_paths)
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    if proc.returncode != 0:  # a failing suite's time is no measurement of the suite
        fd, log_path = tempfile.mkstemp(prefix="flowrl-perf-tests-", suffix=".log")
        with os.fdopen(fd, "w") as handle:
            handle.write(proc.stdout + proc.stderr)
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise RuntimeError(f"the test suite failed ({proc.returncode}: {last}); test_suite_s not written; "
                           f"its whole output: {log_path}")
    return {
        "test_suite_s": round(wall, 1),
        "test_suite": {"workers": args.test_workers, "returncode": proc.returncode, "summary": last,
                       "command": " ".join(["python", *command[1:]]).replace(sys.executable, "python"),
                       **({"paths": args.test_paths} if args.test_paths else {})},
        "tests_provenance": provenance(args.threads),
    }


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "perf.json")
    parser.add_argument("--parts", default="micro", help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--config", default=str(ROOT / "configs" / "shapes.yaml"),
                        help="the config of the shapes model (micro) and of the pipeline run (run)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in this process")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of each side (the fastest counts)")
    parser.add_argument("--batch", type=int, default=64, help="trajectories per shapes rollout and update")
    parser.add_argument("--matmul-sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--skip-qwen", action="store_true", help="leave out the tiny Qwen-Image comparison")
    parser.add_argument("--qwen-size", type=int, default=64, help="image height and width")
    parser.add_argument("--qwen-batch", type=int, default=4)
    parser.add_argument("--qwen-steps", type=int, default=10)
    parser.add_argument("--qwen-cfg", type=float, default=4.0)
    parser.add_argument("--qwen-noise-level", type=float, default=0.7)
    parser.add_argument("--reward-delay-s", type=float, default=0.2, help="injected latency per reward request")
    parser.add_argument("--reward-iterations", type=int, default=3, help="timed GRPO iterations of each side")
    parser.add_argument("--keep-scratch", action="store_true", help="keep the run part's scratch directory")
    parser.add_argument("--test-workers", default=os.environ.get("TEST_WORKERS", "2"))
    parser.add_argument("--test-paths", nargs="*", default=[], help=argparse.SUPPRESS)  # this script's own test
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        parser.error(f"--parts: unknown part(s) {unknown or parts}; choose from {', '.join(PARTS)}")
    args.parts = parts
    if not Path(args.config).is_file():
        parser.error(f"--config: no such file {args.config}")
    for name in ("threads", "repeats", "batch", "qwen_size", "qwen_batch", "qwen_steps", "reward_iterations"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if any(n < 1 for n in args.matmul_sizes):
        parser.error(f"--matmul-sizes must be positive, got {args.matmul_sizes}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    run = {"micro": micro, "run": pipeline_run, "tests": test_suite}
    data: dict = {}
    for part in args.parts:
        data = merge_into(args.output, run[part](args))  # each part lands as soon as it is measured
    print(json.dumps(data, indent=2, sort_keys=True))
    return data


if __name__ == "__main__":
    main()
