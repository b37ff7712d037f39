"""What machine made a result: recorded in results files, manifests and tracker tags.

Float results depend on the CPU, not only on code, config and seeds: torch
and MKL pick kernels by the instruction set they find (AVX2, AVX-512, ...),
and a different summation order shifts the last bits, which a few thousand
training steps amplify into a different model. On one host a stage rebuilt
from the same inputs is bit-identical; across hosts it need not be. The CPU
model and torch's CPU capability are therefore part of every record, so that
two results that disagree can be told apart by where they were made.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

_CPUINFO = Path("/proc/cpuinfo")


def cpu_model(cpuinfo: Path = _CPUINFO) -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() in ("model name", "Model", "cpu model") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info() -> dict[str, object]:
    """Platform, CPU (model, torch's kernel capability, cores), torch build, threads and GPU."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
    }


def machine_summary(info: dict[str, object] | None = None) -> str:
    """One line of :func:`machine_info` for a manifest or a tag:
    ``AMD EPYC (AVX2, 2 cores), torch 2.13.0+cpu, 2 threads``."""
    info = info if info is not None else machine_info()
    line = (f"{info['cpu_model']} ({info['cpu_capability']}, {info['cpu_count']} cores), "
            f"torch {info['torch']}, {info['torch_threads']} threads")
    return f"{line}, {info['gpu']}" if info.get("gpu") else line
