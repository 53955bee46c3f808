"""Building a feature cache of shapes-world pictures: the byte table against the image processor.

Every VLM stage of the book encodes its pictures once into a feature cache (two caches of 20,000
pictures in the default recipe). The pictures are already 224 x 224, so CLIP's resize and centre
crop change nothing, and what is left (rescale, normalise) maps each byte of each channel to one
value: ``Preprocessor`` looks it up in a (3, 256) table (``image_processing.pixels_by_table``).
This script builds the same cache both ways, one right after the other, in one process:

  - "image processor": every picture through transformers' CLIP image processor (the path before),
  - "byte table": the table lookup (the path taken now),

and checks that both caches hold the same tokens bit for bit. The encoder is a tiny CLIP of the
book's size with random weights (its cost is what a trained one's is); the pictures are rendered
shapes-world scenes. The machine's fp32 matmul speed is measured in the same run.

    python benchmarks/bench_feature_cache.py                   # 2000 pictures, 2 repeats
    python benchmarks/bench_feature_cache.py --images 400 --repeats 1
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import numpy as np

from minimind_v.data import shapes
from minimind_v.data.clip_examples import training_scene
from minimind_v.data.features import FeatureCache
from minimind_v.machine import describe_speed
from minimind_v.model.image_processing import Preprocessor
from minimind_v.model.vision import VisionEncoder
from minimind_v.testing import make_random_clip


def render_pictures(folder: Path, count: int) -> None:
    for index in range(count):
        scene, _ = training_scene(0, index)
        shapes.render_scene(scene).save(folder / f"{index:05d}.png")


def build_seconds(encoder, image_dir: Path, cache_dir: Path, table: bool, workers: int) -> float:
    # Without the table, every picture takes the image processor's path (the build before).
    with nullcontext() if table else mock.patch.object(Preprocessor, "value_table", lambda self: None):
        started = time.perf_counter()
        FeatureCache.build(encoder, image_dir, cache_dir, progress=False, num_workers=workers)
        return time.perf_counter() - started


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1],
                        help="decoding processes to try (the build's default: none on two cores, else one per core but one)")
    ns = parser.parse_args(argv)
    print(describe_speed())
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        encoder = VisionEncoder.from_pretrained(make_random_clip(scratch / "clip", width=128))  # the book's tiny CLIP: width 128, 2 layers
        image_dir = scratch / "images"
        image_dir.mkdir()
        render_pictures(image_dir, ns.images)
        rows = []
        for workers in ns.workers:
            seconds = {"image processor": [], "byte table": []}
            for _ in range(ns.repeats):  # interleaved, so drift on a shared machine hits both
                for label, table in (("image processor", False), ("byte table", True)):
                    seconds[label].append(build_seconds(encoder, image_dir, scratch / label.replace(" ", "_"),
                                                        table, workers))
            before, after = (FeatureCache.open(scratch / name, encoder) for name in ("image_processor", "byte_table"))
            same = np.array_equal(before.get(before.names), after.get(after.names))
            base = statistics.median(seconds["image processor"])
            for label, values in seconds.items():
                median = statistics.median(values)
                rows.append((workers, label, ns.images / median, base / median, same))
    print(f"\n{ns.images} shapes-world pictures (224 x 224 PNG), tiny CLIP (random weights), median of {ns.repeats}\n")
    print("| decoding processes | pixels by | pictures/s | vs image processor | same tokens |")
    print("|---:|---|---:|---:|---|")
    for workers, label, rate, ratio, same in rows:
        print(f"| {workers} | {label} | {rate:.0f} | {ratio:.2f}x | {'yes' if same else 'NO'} |")
    print()
    print(describe_speed())


if __name__ == "__main__":
    main()
