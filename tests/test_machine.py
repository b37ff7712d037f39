"""The record of where a result was made (flowrl.machine)."""

import torch

from flowrl.machine import cpu_model, machine_info, machine_summary


def test_cpu_model_reads_the_first_model_name(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n\n"
                    "processor\t: 1\nmodel name\t: AMD EPYC 7B13\n")
    assert cpu_model(info) == "AMD EPYC 7B13"


def test_cpu_model_falls_back_when_the_file_is_missing_or_silent(tmp_path):
    silent = tmp_path / "cpuinfo"
    silent.write_text("processor\t: 0\nmodel name\t:\n")
    for path in (silent, tmp_path / "absent"):
        name = cpu_model(path)
        assert isinstance(name, str) and name and name != "model name"


def test_machine_info_names_the_kernels_torch_runs():
    info = machine_info()
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["torch_threads"] == torch.get_num_threads() and info["torch"] == torch.__version__
    assert info["cpu_model"] == cpu_model() and info["cuda"] == torch.cuda.is_available()


def test_summary_is_one_line_with_cpu_capability_and_threads():
    info = {"cpu_model": "AMD EPYC", "cpu_capability": "AVX2", "cpu_count": 2, "torch": "2.13.0+cpu",
            "torch_threads": 2, "gpu": None}
    assert machine_summary(info) == "AMD EPYC (AVX2, 2 cores), torch 2.13.0+cpu, 2 threads"
    assert machine_summary({**info, "gpu": "NVIDIA H200"}).endswith(", NVIDIA H200")
    assert "\n" not in machine_summary()
