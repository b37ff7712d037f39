"""Flyte task for stage `bench`: pillars, arenas and the report, shown as a Flyte Deck.

Every model the pipeline produced is benched; a branch the config turned off
arrives as an artifact with an empty uri and is left out.
"""

from typing import List

from flytekit import Deck
from flytekit.types.file import FlyteFile

from flowrl.config import load_config
from tasks.launch import stage_task
from tasks.types import StageArtifact, show_progress, stage_cache, tracker_for


def bench_models(**artifacts: StageArtifact) -> dict[str, str]:
    """{name: uri} of the given artifacts that exist, in the order given."""
    return {name: artifact.uri for name, artifact in artifacts.items() if artifact.uri}


def pipeline_headline(metrics: dict[str, float]) -> dict[str, float]:
    """The bench numbers the pipeline's MLflow run carries (of the flat metrics of the bench artifact):
    each model's overall score, every Elo rating with its interval, and each gain over the anchor."""
    return {k: v for k, v in metrics.items()
            if k.endswith("/pillars/overall") or k.startswith(("arenas/", "gains/"))}


# production: one generator loaded at a time (a Qwen-Image pipeline passes through host memory on
# loading), each model's images spilled to local disk until the VLM scorers read them
@stage_task("bench", retries=1, enable_deck=True, cache=stage_cache("bench"))
def bench(
    config: FlyteFile, parent_run: str, base: StageArtifact, t2i_teacher: StageArtifact, edit_teacher: StageArtifact,
    mix_rl: StageArtifact, student: StageArtifact, student_offpolicy: StageArtifact, reward_model: StageArtifact,
) -> StageArtifact:
    from flowrl.stages.bench import report_files, run_bench

    models = bench_models(base=base, t2i_teacher=t2i_teacher, edit_teacher=edit_teacher, mix_rl=mix_rl,
                          student=student, student_offpolicy=student_offpolicy)
    loaded = load_config(config.download())
    # the reward models score the bench only when bench.scorer says so (production: no judge there)
    scorer_rm = reward_model.uri if loaded.bench.scorer == "reward_models" else None
    result = run_bench(loaded, models, reward_model=scorer_rm, tracker=tracker_for(loaded, parent_run),
                       progress=show_progress())
    Deck("Bench report", report_files(result.uri)["report.html"].decode())
    return StageArtifact.of(result)


@stage_task("default", retries=2)
def finish_pipeline_run(config: FlyteFile, parent_run: str, bench: StageArtifact,
                        outputs: List[StageArtifact]) -> str:
    """Check that every output of the run exists (a Flyte cache hit can hand on
    the URI of an artifact deleted since), then close the pipeline's MLflow run
    with the bench's headline scores and its report; returns the report's URI."""
    import tempfile
    from pathlib import Path

    from flowrl.stages.bench import report_files
    from flowrl.storage import file_uri, require_published
    from flowrl.tracking import MLflowTracker

    require_published({a.stage: a.uri for a in [*outputs, bench]})
    loaded = load_config(config.download())
    headline = pipeline_headline(bench.metrics)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for name, data in report_files(bench.uri).items():
            (Path(tmp) / name).write_bytes(data)
            paths.append(Path(tmp) / name)
        MLflowTracker(loaded.run.tracking_uri).finish_pipeline(parent_run, headline, paths)
    return file_uri(bench.uri, "report.html")
