"""Chapter 3, exercises: worked solutions.

Each exercise is one function that computes its answer, checks it with an assert, and returns
it. Run them all with ``python notebooks/solutions/03_solutions.py``; ``tests/test_exercises.py``
runs them too. Everything is built here, small and random: no run folder is needed.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from minimind_v.model.projector import VisionProjector


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def seeded(build, seed: int = 0):
    """build() with its random initialisation drawn from `seed`, leaving the global generator alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def exercise_1():
    """ViT-L/14 (1024) -> base (768).

    linear: 1024 * 768 + 768 = 787,200. mlp: that, plus a 768 x 768 layer with its bias,
    768 * 768 + 768 = 590,592: 1,377,792 in all. Both tiny next to the 109M decoder (0.7%, 1.3%).
    """
    W, dim = 1024, 768
    with torch.device("meta"):
        linear, mlp = count(VisionProjector(W, dim)), count(VisionProjector(W, dim, "mlp"))
    assert linear == W * dim + dim == 787_200
    assert mlp == (W * dim + dim) + (dim * dim + dim) == 1_377_792
    print(f"ViT-L/14 -> base: linear {linear:,}, mlp {mlp:,}")
    return linear, mlp


def exercise_2():
    """The projection treats every token alone, so shuffling its input shuffles its output the
    same way (it is permutation-equivariant). Where a patch was is not in the projection: it is in
    the token itself (CLIP added a position embedding before its layers, chapter 1) and in where
    the token sits among the 50 image positions of the prompt (the decoder's RoPE)."""
    proj = seeded(lambda: VisionProjector(32, 24))
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(1, 50, 32, generator=generator)
    order = torch.randperm(50, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(proj(tokens[:, order]), proj(tokens)[:, order])
    print("proj(shuffled tokens) = shuffled proj(tokens)")
    return order


def exercise_3():
    """The length of a projected token, untrained.

    One output number is sum_j w_ij x_j: with independent weights of variance s^2 its variance is
    s^2 |x|^2. The squared length sums dim of them: E|y|^2 = dim s^2 |x|^2, so |y| ~ s |x| sqrt(dim).
    With s = 0.02 (the VLM's initialisation, zero bias): 0.02 |x| sqrt(dim).
    PyTorch's default, uniform in +-1/sqrt(W): s^2 = 1/(3W), and the bias (same law) adds
    dim/(3W): E|y|^2 = dim (|x|^2 + 1) / (3W). For standard-normal tokens (|x|^2 ~ W) that is
    about dim/3 whatever W, against 0.0004 W dim for the 0.02 initialisation: here (W = 128) the
    default gives tokens 1/(0.02 sqrt(3W)) = 2.6 times longer; from W = 834 on, shorter.
    """
    W, dim = 128, 256
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4000, W, generator=generator)  # 4000 random tokens
    sq = x.pow(2).sum(-1)  # |x|^2 per token
    proj = seeded(lambda: VisionProjector(W, dim))  # PyTorch's default initialisation
    with torch.no_grad():
        default_sq = proj(x).pow(2).sum(-1)
        linear = proj.layers[0]
        nn.init.normal_(linear.weight, std=0.02, generator=generator)  # what the VLM's post_init does
        nn.init.zeros_(linear.bias)
        vlm_sq = proj(x).pow(2).sum(-1)
    ratio_vlm = (vlm_sq.mean() / (dim * 0.02**2 * sq.mean())).item()
    ratio_default = (default_sq.mean() / (dim * (sq.mean() + 1) / (3 * W))).item()
    assert abs(ratio_vlm - 1) < 0.05 and abs(ratio_default - 1) < 0.05, (ratio_vlm, ratio_default)
    print(f"measured / predicted mean squared length: std 0.02 {ratio_vlm:.3f}, PyTorch default {ratio_default:.3f}; "
          f"median length {vlm_sq.sqrt().median():.2f} vs {default_sq.sqrt().median():.2f}")
    return ratio_vlm, ratio_default


def mlp_project(image_tokens, w1, b1, w2, b2):
    """LLaVA-1.5's projector: (B, N, W) -> (B, N, dim) -> GELU -> (B, N, dim)."""
    return F.gelu(image_tokens @ w1.T + b1) @ w2.T + b2


def exercise_4():
    """The MLP projector, written out, against the package's."""
    proj = seeded(lambda: VisionProjector(32, 24, "mlp"))
    first, _, second = proj.layers  # Linear, GELU, Linear
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randn(2, 50, 32, generator=generator)
    with torch.no_grad():
        ours = mlp_project(tokens, first.weight, first.bias, second.weight, second.bias)
        torch.testing.assert_close(ours, proj(tokens))
    print("mlp_project = VisionProjector(..., 'mlp'):", tuple(ours.shape))
    return ours.shape


if __name__ == "__main__":
    for n in range(1, 5):
        print(f"--- exercise {n}")
        globals()[f"exercise_{n}"]()
