"""How fast is the frozen vision encoder, and how much does the feature cache save?

Prints a table of images/s for: preprocessing, the encoder batched vs one image at a time,
encoding image files end to end, and reading cached tokens (batched and one by one); then the
batched encoder's achieved FLOP/s against a large matmul measured in the same run.

    python benchmarks/bench_vision.py                       # random weights, ViT-B/32 shape
    python benchmarks/bench_vision.py --preset tiny         # 224 px / patch 32, width 64: seconds
    python benchmarks/bench_vision.py --model <clip folder> --device cuda --dtype float16

Random weights cost exactly what trained ones do, so the default needs no download.
Timings are best-of-N wall clock; on a shared machine expect noise.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from minimind_v.data.features import FeatureCache
from minimind_v.model.vision import VisionEncoder
from minimind_v.testing import make_random_clip

PRESETS = {
    # ViT-B/32: 224 px, patch 32 -> 50 tokens, width 768, 12 layers, 12 heads (88M parameters)
    "b32": dict(image_size=224, patch_size=32, width=768, layers=12, heads=12),
    # same geometry (50 tokens), toy width: for a quick run
    "tiny": dict(image_size=224, patch_size=32, width=64, layers=2, heads=2),
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(function, repeats: int, device: torch.device) -> float:
    """Fastest of `repeats` timed calls, after one warm-up call."""
    function()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_flops_per_second(device: torch.device, dtype: torch.dtype, repeats: int) -> tuple[float, int]:
    """Measured throughput of one large square matmul (2 n^3 FLOPs)."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = best_seconds(lambda: torch.matmul(a, b), repeats, device)
    return 2 * n**3 / seconds, n


def make_images(folder: Path, count: int, seed: int = 0) -> list[str]:
    """Photo-sized random JPEGs (640 x 480), like the COCO images of the real dataset."""
    rng = np.random.default_rng(seed)
    names = []
    for i in range(count):
        name = f"{i:05d}.jpg"
        pixels = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name, quality=90)
        names.append(name)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a CLIP model folder or hub id (default: random weights, see --preset)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="b32", help="shape of the random encoder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="encoder weights dtype")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=128, help="image files for the end-to-end and cache rows")
    parser.add_argument("--singles", type=int, default=16, help="images encoded one at a time")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0, help="image-decoding processes for the file rows")
    args = parser.parse_args()

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        source = args.model or make_random_clip(scratch / "clip", **PRESETS[args.preset])
        encoder = VisionEncoder.from_pretrained(source, device=device, dtype=dtype)
        label = args.model or f"random CLIP, preset {args.preset}"
        parameters = sum(p.numel() for p in encoder.parameters())
        print(
            f"encoder: {label}: {encoder.image_size} px / patch {encoder.patch_size} -> {encoder.num_tokens} tokens "
            f"x {encoder.width}, {parameters / 1e6:.1f}M parameters, {encoder.flops_per_image() / 1e9:.2f} GFLOP/image"
        )
        hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
        print(f"device: {device} ({hardware}), dtype {args.dtype}, torch {torch.__version__}, batch {args.batch_size}")

        image_dir = scratch / "images"
        image_dir.mkdir()
        names = make_images(image_dir, args.images)
        pil_images = [Image.open(image_dir / name).convert("RGB") for name in names[: args.batch_size]]

        rows = []  # (what, images per call, seconds per call)
        seconds = best_seconds(lambda: encoder.preprocess(pil_images), args.repeats, torch.device("cpu"))
        rows.append(("preprocess PIL -> pixels (CPU)", len(pil_images), seconds))

        pixels = encoder.preprocess(pil_images).to(device)
        batch = pixels[: args.batch_size]
        seconds = best_seconds(lambda: encoder(batch), args.repeats, device)
        rows.append((f"encode, batch of {len(batch)}", len(batch), seconds))
        batched_images_per_second = len(batch) / seconds

        singles = pixels[: args.singles]

        def one_at_a_time():
            for i in range(len(singles)):
                encoder(singles[i : i + 1])

        seconds = best_seconds(one_at_a_time, args.repeats, device)
        rows.append(("encode, one image at a time", len(singles), seconds))

        # End to end from files, as a training step without the cache would do (decode, resize, encode).
        started = time.perf_counter()
        cache = FeatureCache.build(
            encoder, image_dir, scratch / "cache", batch_size=args.batch_size, progress=False, num_workers=args.workers
        )
        synchronize(device)
        rows.append(("encode from files (load+preprocess+encode), build cache", len(names), time.perf_counter() - started))

        rng = np.random.default_rng(1)
        picks = [names[i] for i in rng.integers(0, len(names), args.batch_size)]
        seconds = best_seconds(lambda: cache.get(picks), args.repeats * 10, torch.device("cpu"))
        rows.append((f"cached tokens, get() batch of {len(picks)}", len(picks), seconds))

        def cached_one_at_a_time():
            for name in picks:
                cache[name]

        seconds = best_seconds(cached_one_at_a_time, args.repeats, torch.device("cpu"))
        rows.append(("cached tokens, one image at a time", len(picks), seconds))

        print()
        print(f"{'what':<58} {'images/s':>11} {'ms/image':>10} {'vs batched encode':>18}")
        print("-" * 100)
        for what, count, seconds in rows:
            rate = count / seconds
            print(f"{what:<58} {rate:>11,.1f} {1e3 / rate:>10.3f} {rate / batched_images_per_second:>17.2f}x")

        peak_fp32, n = matmul_flops_per_second(device, torch.float32, args.repeats)
        achieved = batched_images_per_second * encoder.flops_per_image()
        print()
        print(f"matmul peak (measured, {n}x{n} float32): {peak_fp32 / 1e9:,.1f} GFLOP/s")
        if dtype != torch.float32:
            peak_dtype, _ = matmul_flops_per_second(device, dtype, args.repeats)
            print(f"matmul peak (measured, {n}x{n} {args.dtype}): {peak_dtype / 1e9:,.1f} GFLOP/s")
        else:
            peak_dtype = peak_fp32
        print(
            f"batched encoder: {achieved / 1e9:,.1f} GFLOP/s = {100 * achieved / peak_fp32:.0f}% of the float32 matmul peak"
            + (f", {100 * achieved / peak_dtype:.0f}% of the {args.dtype} peak" if dtype != torch.float32 else "")
        )
        print(
            f"(cached rows come from the page cache: the token file is {cache.features.nbytes / 1e6:.1f} MB; "
            f"a cache larger than RAM reads at disk speed)"
        )
        print(
            f"summary: batched encode {batched_images_per_second:,.1f} images/s; "
            f"cached tokens {rows[4][1] / rows[4][2]:,.0f} images/s "
            f"({(rows[4][1] / rows[4][2]) / (rows[3][1] / rows[3][2]):,.0f}x faster than encoding from files)"
        )


if __name__ == "__main__":
    main()
