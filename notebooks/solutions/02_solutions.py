"""Chapter 2, exercises: worked solutions.

Each exercise is one function that computes its answer, checks it with an assert, and returns
it. Run them all with ``python notebooks/solutions/02_solutions.py``; ``tests/test_exercises.py``
runs them too. Everything is built here, small and random: no run folder is needed.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from minimind_v.config import config_from_preset
from minimind_v.model.llm import Attention, FeedForward, MiniMindForCausalLM, RMSNorm, apply_rope, rope_tables


def rms(t):
    return t.pow(2).mean(-1).sqrt()


def rope(x, theta=1e4):
    """The chapter's RoPE: x (B, H, T, hd), pairs (x[2i], x[2i+1]) turned by p * theta^(-2i/hd)."""
    T, hd = x.shape[-2:]
    per_position = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = torch.outer(torch.arange(T, dtype=torch.float64), per_position)
    cos, sin = angles.cos().float(), angles.sin().float()
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def attention(x, layer, theta=1e4, causal=True):
    """The chapter's attention, with the causal mask as an option (exercise 4)."""
    B, T, _ = x.shape
    H, KV, hd = layer.n_heads, layer.n_kv_heads, layer.head_dim
    q = rope(layer.wq(x).view(B, T, H, hd).transpose(1, 2), theta)
    k = rope(layer.wk(x).view(B, T, KV, hd).transpose(1, 2), theta)
    v = layer.wv(x).view(B, T, KV, hd).transpose(1, 2)
    k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
    scores = q @ k.transpose(-2, -1) / hd**0.5
    if causal:
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    out = scores.softmax(-1) @ v
    return layer.wo(out.transpose(1, 2).reshape(B, T, H * hd))


def seeded(build, seed: int = 0):
    """build() with its random initialisation drawn from `seed`, leaving the global generator alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def exercise_1():
    """RMSNorm(c x) = RMSNorm(x) for c > 0, up to eps.

    The output's RMS is rms / sqrt(rms^2 + eps) = 1 / sqrt(1 + eps / rms^2): at RMS 0.02 that is
    1 / sqrt(1.025) = 0.9877 (eps is 2.5% of rms^2), at RMS 2 it is 0.9999988. So the untrained
    model's first norm is not quite scale-invariant; a trained residual stream, much larger, is.
    c < 0 flips the sign of the output: RMSNorm(-x) = -RMSNorm(x).
    """
    norm = RMSNorm(64, eps=1e-5)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 64, generator=generator)
    x = x / rms(x)[:, None]  # every row: RMS exactly 1
    answers = {}
    with torch.no_grad():
        for size in (0.02, 2.0):
            predicted = 1 / math.sqrt(1 + norm.eps / size**2)
            measured = rms(norm(size * x)).mean().item()
            assert math.isclose(measured, predicted, rel_tol=1e-5), (size, measured, predicted)
            answers[size] = measured
        torch.testing.assert_close(norm(300 * x), norm(2 * x))  # large vectors: scale-invariant
        assert (norm(0.06 * x) - norm(0.02 * x)).abs().max() > 1e-3  # small ones: not quite
        torch.testing.assert_close(norm(-2 * x), -norm(2 * x))
    print("output RMS for input RMS 0.02 and 2:", {k: round(v, 7) for k, v in answers.items()})
    return answers


def exercise_2():
    """RoPE: the score of a query at m with a key at n depends on m - n only.

    (5, 2), (105, 102) and (1000, 997) all have m - n = 3: the same score (up to float32
    rounding of the large angles). (2, 5) has m - n = -3: the rotation between the two goes the
    other way, so the score differs. Without RoPE every pair would score the same.
    """
    hd = 32
    cos, sin = rope_tables(hd, 1024)  # (1024, hd/2) each
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 1, 1, hd, generator=generator)  # (B, H, T, hd) = (1, 1, 1, 32) each

    def at(v, p):
        return apply_rope(v, cos[p:p + 1][None, None], sin[p:p + 1][None, None])

    def score(m, n):
        return (at(q, m) * at(k, n)).sum().item()

    scores = {pair: score(*pair) for pair in ((5, 2), (105, 102), (1000, 997), (2, 5))}
    assert math.isclose(scores[(5, 2)], scores[(105, 102)], abs_tol=1e-4)
    assert math.isclose(scores[(5, 2)], scores[(1000, 997)], abs_tol=1e-4)
    assert abs(scores[(5, 2)] - scores[(2, 5)]) > 1e-2
    print("q.k by (m, n):", {pair: round(s, 4) for pair, s in scores.items()})
    return scores


def kv_cache_bytes(layers: int, kv_heads: int, head_dim: int, tokens: int, bytes_per_number: int = 2) -> int:
    """One key and one value vector per layer, key/value head and position."""
    return 2 * layers * kv_heads * head_dim * tokens * bytes_per_number


def exercise_3():
    """KV cache: 2 x layers x kv_heads x head_dim x tokens x bytes.

    small (head_dim 512/16 = 32), 1024 tokens, bfloat16: 2 * 8 * 8 * 32 * 1024 * 2 = 8 MiB;
    with 16 key/value heads 16 MiB. base (head_dim 768/16 = 48, 16 layers): 24 MiB, against 48.
    GQA halves the cache, the memory that grows with every token of every sequence being generated.
    """
    MiB = 2**20
    answers = {
        "small": kv_cache_bytes(8, 8, 32, 1024) / MiB, "small, MHA": kv_cache_bytes(8, 16, 32, 1024) / MiB,
        "base": kv_cache_bytes(16, 8, 48, 1024) / MiB, "base, MHA": kv_cache_bytes(16, 16, 48, 1024) / MiB,
    }
    assert answers == {"small": 8, "small, MHA": 16, "base": 24, "base, MHA": 48}
    # The formula against a real cache: `small`'s attention shape, 2 layers, 40 tokens, bfloat16.
    for kv_heads in (8, 16):
        config = config_from_preset("small", vocab_size=64, n_layers=2, n_kv_heads=kv_heads)
        model = seeded(lambda: MiniMindForCausalLM(config)).to(torch.bfloat16).eval()
        with torch.no_grad():
            cache = model(input_ids=torch.zeros(1, 40, dtype=torch.long), use_cache=True).cache
        filled = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
        assert filled == kv_cache_bytes(2, kv_heads, 32, 40), (kv_heads, filled)
    print("KV cache for 1024 tokens, MiB:", answers)
    return answers


def exercise_4():
    """Without the mask, every position sees the last token, so every output changes.

    With the mask only the last position changes. Trained without it, position t would read token
    t+1 from its input and copy it: a training loss near zero and a model that cannot generate,
    because at generation time the next token is not there to read.
    """
    config = config_from_preset("tiny", vocab_size=64)
    layer = seeded(lambda: Attention(config, layer_idx=0))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8, config.dim, generator=generator)
    y = x.clone()
    y[0, -1] = torch.randn(config.dim, generator=generator)  # only the last token differs
    changed = {}
    with torch.no_grad():
        for causal in (True, False):
            diff = (attention(x, layer, causal=causal) - attention(y, layer, causal=causal)).abs().amax(-1)[0]
            changed[causal] = (diff > 1e-6).nonzero().flatten().tolist()
    assert changed[True] == [7] and changed[False] == list(range(8))
    print("positions whose output changes: with the mask", changed[True], "; without", changed[False])
    return changed


def exercise_5():
    """SwiGLU width: small 64 * ceil(1365.3 / 64) = 1408; base 8 * 768 / 3 = 2048 exactly.

    At dim 768: SwiGLU 3 * 768 * 2048 = 4,718,592 parameters, a 4x MLP 2 * 768 * 3072 = 4,718,592.
    8/3 is the width that makes three matrices cost what two 4x ones do.
    """
    widths = {name: config_from_preset(name, vocab_size=64).hidden_dim for name in ("small", "base")}
    assert widths == {"small": 1408, "base": 2048}
    for name, dim in (("small", 512), ("base", 768)):
        assert widths[name] == 64 * math.ceil(8 * dim / 3 / 64)
    with torch.device("meta"):
        swiglu = sum(p.numel() for p in FeedForward(config_from_preset("base", vocab_size=64)).parameters())
        classic = nn.Sequential(nn.Linear(768, 3072, bias=False), nn.Linear(3072, 768, bias=False))
        mlp = sum(p.numel() for p in classic.parameters())
    assert swiglu == mlp == 4_718_592
    print("hidden widths:", widths, f"; parameters at dim 768: SwiGLU {swiglu:,}, 4x MLP {mlp:,}")
    return widths


if __name__ == "__main__":
    for n in range(1, 6):
        print(f"--- exercise {n}")
        globals()[f"exercise_{n}"]()
