"""Does reading the training data stay cheap as the data grows? (The original's SFT file has ~2.9M rows.)

Writes synthetic parquet files in the original's layout (a JSON conversation and a small JPEG per
row; a share of text-only rows with the 8x8 placeholder, a share with two pictures) of 10k, 100k
and 1M rows in a temporary folder, and reads each through the training dataset
(``open_chat_dataset`` -> ``ParquetChatDataset``, pictures through a 224 px CLIP preprocessing),
each size in a fresh process so that its peak memory is its own:

- start-up: seconds to open the dataset (what every rank pays before its first step);
- memory: resident set after the imports, after start-up, and the peak after reading;
- samples/s: random order (what the trainer's shuffled batches do) and file order;

beside the same numbers for the v1 JSON loader (``ChatDataset``, text only: it reads and tokenises
every record at start-up) at the sizes where that takes less than a few minutes, and the
machine's float32 matmul GFLOP/s measured in the same run.

    python benchmarks/bench_data_scale.py                      # 10k, 100k, 1M rows
    python benchmarks/bench_data_scale.py --rows 10000 100000  # fewer sizes
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def rss_mb() -> float:
    """The resident set now (Linux /proc), in MB."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except OSError:
        return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # KB on Linux


def rss_parts_mb() -> dict:
    """The resident set split (Linux /proc/self/status): private memory (RssAnon) and pages of
    mapped files (RssFile: the memory-mapped parquet pages read so far, shared with the page cache
    and dropped by the kernel under pressure, never written to swap)."""
    parts = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile", "VmHWM"):
                    parts[key] = int(value.split()[0]) / 1e3
    except OSError:
        pass
    return parts


def synthetic_rows(n: int, seed: int = 0, pictures: int = 64):
    """n rows like the original's: captions and Q&A about small JPEGs; 8% text-only rows (the 8x8
    placeholder), 5% with two pictures."""
    from PIL import Image

    from minimind_v.data.parquet import placeholder_picture

    rng = random.Random(seed)
    jpegs = []
    for i in range(pictures):  # a pool of distinct 32x32 JPEGs, reused
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), (rng.randrange(256), rng.randrange(256), rng.randrange(256))).save(
            buffer, format="JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    black = placeholder_picture()
    words = "the a red green blue small large circle square triangle cross top left right bottom center picture".split()
    for i in range(n):
        question = " ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) + "?"
        answer_text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 30))) + "."
        kind = rng.random()
        if kind < 0.08:
            turns, images = [{"role": "user", "content": question}, {"role": "assistant", "content": answer_text}], [black]
        elif kind < 0.13:
            turns = [{"role": "user", "content": f"<image>\n<image>\n{question}"},
                     {"role": "assistant", "content": answer_text}]
            images = [rng.choice(jpegs), rng.choice(jpegs)]
        else:
            turns = [{"role": "user", "content": f"<image>\n{question}"}, {"role": "assistant", "content": answer_text}]
            images = [rng.choice(jpegs)]
        yield {"conversations": turns, "image_bytes": images}


def write_data(folder: Path, n: int) -> tuple[Path, Path, float]:
    """(parquet file, JSON records file (text only, for the v1 loader), seconds to write both)."""
    from minimind_v.data.parquet import write_chat_parquet

    start = time.perf_counter()
    parquet = folder / f"rows_{n}.parquet"
    write_chat_parquet(parquet, synthetic_rows(n), several_pictures=True)
    records = folder / f"rows_{n}.json"
    if n <= 100_000:
        with open(records, "w", encoding="utf-8") as f:
            f.write("[\n")
            for i, row in enumerate(synthetic_rows(n)):
                conv = [{"from": "human" if t["role"] == "user" else "gpt", "value": t["content"]}
                        for t in row["conversations"]]
                f.write((",\n" if i else "") + json.dumps({"id": str(i), "image": f"{i}.jpg", "conversations": conv}))
            f.write("\n]\n")
    return parquet, records, time.perf_counter() - start


def child(args) -> None:
    """One measurement in this fresh process; prints one JSON line."""
    import numpy as np
    import pyarrow.parquet  # noqa: F401 - imported before the baseline, as the package's own imports are
    import torch

    from minimind_v.data.datasets import ChatDataset, open_chat_dataset
    from minimind_v.model.vision import VisionEncoder
    from minimind_v.tokenizer import load_tokenizer

    torch.set_num_threads(1)
    tokenizer = load_tokenizer(args.tokenizer)
    encoder = VisionEncoder.from_pretrained(args.clip) if args.layout == "parquet" else None
    base = rss_mb()
    base_anon = rss_parts_mb().get("RssAnon", float("nan"))
    start = time.perf_counter()
    if args.layout == "parquet":
        ds = open_chat_dataset(args.path, tokenizer, encoder.num_tokens, preprocess=encoder.preprocess,
                               max_length=512)
    else:
        ds = ChatDataset(args.path, tokenizer, text_only=True, max_length=512)
    startup = time.perf_counter() - start
    after_startup = rss_mb()
    rng = np.random.default_rng(0)
    rates = {}
    for order in ("random", "file"):
        count = min(args.samples, len(ds))
        indices = rng.integers(0, len(ds), count) if order == "random" else np.arange(count) + len(ds) // 2 - count // 2
        t0 = time.perf_counter()
        for i in indices:
            ds[int(i)]
        rates[order] = count / (time.perf_counter() - t0)
    parts = rss_parts_mb()
    print(json.dumps({"rows": len(ds), "layout": args.layout, "startup_s": startup, "base_mb": base,
                      "startup_mb": after_startup, "peak_mb": peak_rss_mb(), "random_per_s": rates["random"],
                      "file_per_s": rates["file"], "private_growth_mb": parts.get("RssAnon", float("nan")) - base_anon,
                      "file_pages_mb": parts.get("RssFile", float("nan"))}))


def measure(path: Path, layout: str, tokenizer: Path, clip: Path, samples: int) -> dict:
    command = [sys.executable, __file__, "--child", "--path", str(path), "--layout", layout, "--tokenizer",
               str(tokenizer), "--clip", str(clip), "--samples", str(samples)]
    out = subprocess.run(command, check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def matmul_gflops() -> float:
    import torch

    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--samples", type=int, default=2000, help="samples drawn per order and size")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--layout", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--clip", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from minimind_v.testing import make_random_clip
    from minimind_v.tokenizer import train_tokenizer

    with tempfile.TemporaryDirectory(prefix="bench_data_scale_") as tmp:
        tmp = Path(tmp)
        texts = [json.dumps(r["conversations"]) for r in synthetic_rows(2000, seed=1)]
        train_tokenizer(texts, tmp / "tokenizer", vocab_size=600)
        # ViT-B/32 preprocessing (224 px); the weights are never run here.
        clip = make_random_clip(tmp / "clip", image_size=224, patch_size=32, width=32, layers=1, heads=2)
        gflops = matmul_gflops()
        rows = []
        for n in args.rows:
            parquet, records, write_s = write_data(tmp, n)
            size_mb = parquet.stat().st_size / 1e6
            print(f"wrote {n} rows ({size_mb:.0f} MB parquet) in {write_s:.1f} s", file=sys.stderr, flush=True)
            rows.append({**measure(parquet, "parquet", tmp / "tokenizer", clip, args.samples), "file_mb": size_mb})
            if records.exists():
                rows.append({**measure(records, "json", tmp / "tokenizer", clip, args.samples),
                             "file_mb": records.stat().st_size / 1e6})
            parquet.unlink()
            records.unlink(missing_ok=True)
        print(f"\nmachine: {os.cpu_count()} CPUs, float32 matmul {gflops:.1f} GFLOP/s (1024^2, one process)\n")
        print("| rows | layout | file MB | start-up s | RSS after imports MB | RSS after start-up MB | "
              "peak RSS MB | of it, private memory grown MB | of it, file pages MB | samples/s random | "
              "samples/s file order |")
        print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            layout = "parquet (lazy)" if r["layout"] == "parquet" else "JSON, text only (v1 loader)"
            print(f"| {r['rows']:,} | {layout} | {r['file_mb']:.0f} | {r['startup_s']:.2f} | {r['base_mb']:.0f} | "
                  f"{r['startup_mb']:.0f} | {r['peak_mb']:.0f} | {r['private_growth_mb']:.0f} | "
                  f"{r['file_pages_mb']:.0f} | {r['random_per_s']:.0f} | {r['file_per_s']:.0f} |")


if __name__ == "__main__":
    main()
