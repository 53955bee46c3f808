"""The speed figures printed beside timings, and the cores a process may use."""

import os

import torch

from minimind_v.machine import describe_speed, matmul_gflops, read_gbytes_per_second, usable_cores


def test_matmul_gflops_is_positive_and_draws_nothing_from_the_global_generator():
    state = torch.random.get_rng_state()
    assert matmul_gflops(n=64, repeats=1) > 0
    assert torch.equal(torch.random.get_rng_state(), state)
    assert describe_speed().startswith("fp32 matmul ") and "GFLOP/s (2048²" in describe_speed()


def test_read_bandwidth_is_positive():
    assert read_gbytes_per_second(megabytes=8, repeats=1) > 0


def test_usable_cores_follows_the_affinity_mask_and_a_cgroup_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert usable_cores(tmp_path) == 4  # no cpu.max: the mask decides
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cores(tmp_path) == 4  # no quota
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert usable_cores(tmp_path) == 2  # 1.5 CPUs of time: two cores busy part-time
    (tmp_path / "cpu.max").write_text("20000 100000\n")
    assert usable_cores(tmp_path) == 1  # never below one
    (tmp_path / "cpu.max").write_text("800000 100000\n")
    assert usable_cores(tmp_path) == 4  # a quota above the mask: the mask decides
    (tmp_path / "cpu.max").write_text("garbled")
    assert usable_cores(tmp_path) == 4


def test_describe_speed_adds_the_bf16_figure_only_where_bf16_is_native(monkeypatch):
    import minimind_v.machine as machine

    monkeypatch.setattr(machine, "native_bf16", lambda device: False)
    assert "bf16" not in machine.describe_speed()
    monkeypatch.setattr(machine, "native_bf16", lambda device: True)
    text = machine.describe_speed()
    assert text.startswith("fp32 matmul ") and ", bf16 " in text and text.endswith(" GFLOP/s")
    assert float(text.split(", bf16 ")[1].split()[0]) > 0
