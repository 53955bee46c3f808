"""The speed figure printed beside timings: a positive number that leaves the global RNG alone."""

import torch

from minimind_v.machine import describe_speed, matmul_gflops


def test_matmul_gflops_is_positive_and_draws_nothing_from_the_global_generator():
    state = torch.random.get_rng_state()
    assert matmul_gflops(n=64, repeats=1) > 0
    assert torch.equal(torch.random.get_rng_state(), state)
    assert describe_speed().startswith("fp32 matmul ") and "GFLOP/s (2048²" in describe_speed()
