"""The pieces of sharded checkpoints on their own: the streaming safetensors
writer, chunked reads, assembling parameters from rank files, and the EMA of
the plain engine for modules that are not all trained fp32."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import flowrl.rl.shards as shards
from flowrl.rl.ema import EMA
from flowrl.rl.shards import (SHARDED, Fragment, FrozenPiece, SafetensorsWriter, ShardError, consolidate, read_into,
                              shard_metadata, shard_name)


def test_streamed_file_reads_back_exactly_with_views_of_one_buffer(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "_CHUNK_ELEMENTS", 5)  # several chunks per tensor
    flat = torch.arange(23, dtype=torch.float32)
    tensors = {"a": flat[:11], "b": flat[11:].view(3, 4), "c": torch.randn(7).to(torch.bfloat16),
               "d": torch.tensor([True, False, True]), "e": torch.tensor(3.0), "f": torch.empty(0, 2)}
    specs = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    with SafetensorsWriter(tmp_path / "x.safetensors", specs, {"k": "v"}) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
    back = load_file(tmp_path / "x.safetensors")
    assert back.keys() == tensors.keys()
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in tensors.items())
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as handle:
        assert handle.metadata() == {"k": "v"}
        target = torch.zeros(11)
        read_into(handle, "a", target)
        assert torch.equal(target, flat[:11])
        with pytest.raises(ShardError, match="shape"):
            read_into(handle, "a", torch.zeros(12))


def test_writer_refuses_tensors_out_of_order_and_a_short_file(tmp_path):
    specs = [("a", torch.float32, (2,)), ("b", torch.float32, (3,))]
    writer = SafetensorsWriter(tmp_path / "x.safetensors", specs)
    with pytest.raises(ShardError, match="expected a"):
        writer.add("b", torch.zeros(3))
    writer.add("a", torch.zeros(2))
    with pytest.raises(ShardError, match="unwritten"):
        writer.close()


def _rank_file(path, rank, world, tensors, fragments, frozen=()):
    specs = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    with SafetensorsWriter(path / shard_name(rank, world), specs,
                           shard_metadata(rank, world, 3, 1, list(fragments), list(frozen))) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)


def test_consolidation_puts_each_parameter_together_from_its_fragments(tmp_path):
    """Two ranks, ZeRO-3 style: w (2 x 3, 6 elements) split 3 + 3, b (5 elements) split 3 + 2 with the
    second rank's partition padded; a frozen f split over both; one buffer on rank 0."""
    w, b, f = torch.arange(6.0).reshape(2, 3), torch.arange(10.0, 15.0), torch.arange(20.0, 24.0)
    m1, m2, avg = (lambda t: t * 0.1), (lambda t: t * 0.01), (lambda t: t + 0.5)
    flat0 = torch.cat([w.flatten()[:3], b[:3]])
    flat1 = torch.cat([w.flatten()[3:], b[3:], torch.zeros(1)])  # padding at the end
    for rank, flat in ((0, flat0), (1, flat1)):
        tensors = {"fp32.0": flat, "exp_avg.0": m1(flat), "exp_avg_sq.0": m2(flat), "step.0": torch.tensor(4.0),
                   "ema.0": avg(flat), "frozen.f": f[2 * rank:2 * rank + 2]}
        if rank == 0:
            tensors["buffer.scale"] = torch.tensor([2.0])
        count_b = 3 if rank == 0 else 2
        _rank_file(tmp_path, rank, 2, tensors,
                   [Fragment("w", 0, 0, 3 * rank, 3), Fragment("b", 0, 3, 3 * rank, count_b)],
                   [FrozenPiece("f", 2 * rank, 2)])
    layout = {"format": 1, "zero_stage": 3, "world": 2, "ema": True, "buffers": ["scale"],
              "state_keys": ["w", "b", "f", "scale"],
              "params": [{"name": "w", "shape": [2, 3], "dtype": "bfloat16", "trained": True},
                         {"name": "b", "shape": [5], "dtype": "float32", "trained": True},
                         {"name": "f", "shape": [4], "dtype": "float32", "trained": False}]}
    (tmp_path / SHARDED).write_text(json.dumps(layout))
    torch.save({"param_groups": [{"lr": 0.1}], "torch_rng": torch.get_rng_state()}, tmp_path / "trainer.pt")
    full = consolidate(tmp_path)
    assert list(full.weights) == ["w", "b", "f", "scale"]
    assert full.weights["w"].dtype == torch.bfloat16 and torch.equal(full.weights["w"], w.to(torch.bfloat16))
    assert torch.equal(full.weights["b"], b) and torch.equal(full.weights["f"], f)
    assert torch.equal(full.ema["w"], avg(w)) and full.ema["w"].dtype == torch.float32  # the average stays fp32
    assert full.optimizer["param_groups"] == [{"lr": 0.1, "params": [0, 1, 2]}]
    assert sorted(full.optimizer["state"]) == [0, 1]  # the frozen one has no AdamW state
    assert torch.equal(full.optimizer["state"][1]["exp_avg"], m1(b))
    assert float(full.optimizer["state"][0]["step"]) == 4.0
    (tmp_path / shard_name(1, 2)).unlink()
    with pytest.raises(ShardError, match="missing rank file"):
        consolidate(tmp_path)


def test_a_missing_fragment_is_an_error_naming_the_parameter(tmp_path):
    _rank_file(tmp_path, 0, 1, {"fp32.0": torch.zeros(2)}, [Fragment("w", 0, 0, 0, 2)])
    (tmp_path / SHARDED).write_text(json.dumps({
        "format": 1, "zero_stage": 2, "world": 1, "ema": False, "buffers": [], "state_keys": ["w"],
        "params": [{"name": "w", "shape": [3], "dtype": "float32", "trained": True}]}))
    torch.save({"param_groups": [{}], "torch_rng": torch.get_rng_state()}, tmp_path / "trainer.pt")
    with pytest.raises(ShardError, match="hold 2 of the 3 elements of w"):
        consolidate(tmp_path)


def test_ema_of_a_bf16_or_partly_frozen_module_keeps_fp32_averages_of_the_trained_weights():
    """A 0.999 step on a bf16 weight rounds away; the fp32 average keeps it. Frozen parameters get no
    average; swapping the averages in and out restores the module exactly."""
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)).to(torch.bfloat16)
    net[1].requires_grad_(False)
    ema = EMA(net, 0.999)
    assert ema.shadow is None and set(ema.averages) == {"0.weight", "0.bias"}
    assert all(v.dtype == torch.float32 for v in ema.averages.values())
    start = net[0].weight.detach().float().clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    ema.update(net)
    torch.testing.assert_close(ema.averages["0.weight"], start + 0.001 * (net[0].weight.float() - start))
    assert not torch.equal(ema.averages["0.weight"].to(torch.bfloat16).float(), ema.averages["0.weight"])
    live = {k: v.clone() for k, v in net.state_dict().items()}
    with ema.swapped(net):
        assert torch.equal(net[0].weight, ema.averages["0.weight"].to(torch.bfloat16))
    assert all(torch.equal(v, live[k]) for k, v in net.state_dict().items())
    weights = ema.weights(net)
    assert weights.keys() == live.keys() and torch.equal(weights["1.weight"], live["1.weight"])
    fresh = EMA(net, 0.999)
    fresh.load_state_dict({**ema.state_dict(), "1.weight": live["1.weight"]})  # a full state dict loads too
    assert torch.equal(fresh.averages["0.weight"], ema.averages["0.weight"])
    with pytest.raises(KeyError, match="0.bias"):
        fresh.load_state_dict({"0.weight": ema.averages["0.weight"]})


def test_ema_of_an_all_trained_fp32_module_is_the_shadow_copy_as_before():
    net = torch.nn.Linear(3, 3)
    ema = EMA(net, 0.5)
    assert ema.averages is None and ema.state_dict().keys() == net.state_dict().keys()
