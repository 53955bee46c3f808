"""How fast is this machine? One number to print next to every timing.

Machines of the same kind differ (the book has taken 20 minutes on one 2-core machine and 38 on
another), so a timing means little alone. Next to it, the book prints what one large float32
matrix product runs at here: a reader divides by it to compare their machine with ours.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

from .precision import native_bf16


def matmul_gflops(n: int | None = None, repeats: int = 3, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of the fastest of ``repeats`` (n x n) @ (n x n) products of ``dtype`` (2 n^3 FLOPs
    each), after one warm-up, with torch's current threads (2048 on a CPU, 8192 on a GPU by default)."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 2048)
    generator = torch.Generator(device=device).manual_seed(0)  # leaves the global RNG alone
    a = torch.randn(n, n, device=device, generator=generator).to(dtype)
    b = torch.randn(n, n, device=device, generator=generator).to(dtype)
    best = float("inf")
    for attempt in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if attempt:  # the first call warms up
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def describe_speed() -> str:
    """'fp32 matmul 131 GFLOP/s (2048², 2 threads)': the figure to print beside a timing; where the
    CPU multiplies bfloat16 natively (and training runs in it, precision.py) its figure follows:
    '..., bf16 620 GFLOP/s'."""
    text = f"fp32 matmul {matmul_gflops():.0f} GFLOP/s (2048², {torch.get_num_threads()} threads)"
    if native_bf16("cpu"):
        text += f", bf16 {matmul_gflops(dtype=torch.bfloat16):.0f} GFLOP/s"
    return text


def read_gbytes_per_second(megabytes: int = 256, repeats: int = 3, device: str | torch.device = "cpu") -> float:
    """GB/s at which this machine reads memory: the fastest of ``repeats`` sums over a float32
    tensor of ``megabytes`` (far larger than any cache), after one warm-up. Batch-1 decoding
    reads every weight once per token, so this bounds its tokens/s."""
    device = torch.device(device)
    x = torch.ones(megabytes * 2**20 // 4, device=device)
    best = float("inf")
    for attempt in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        x.sum()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if attempt:
            best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best / 1e9


def usable_cores(cgroup: str | os.PathLike = "/sys/fs/cgroup") -> int:
    """CPU cores this process may really use: those its affinity mask allows, fewer when a cgroup
    quota (``cpu.max``, containers and CI runners) grants less CPU time than that. ``os.cpu_count``
    counts the machine's cores, which a container may be far from owning."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    try:
        quota, period = (Path(cgroup) / "cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 file, or one that says something else
        pass
    return max(1, cores)
