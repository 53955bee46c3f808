"""Where a training step's time goes, for the recipe's own VLM stages, before anything is sped up.

Each stage is built exactly as the recipe builds it (`train.vlm.prepare_stage` with the recipe's
flags: same model, same data, same feature cache, same batch), then runs a few hundred steps of
the trainer's step (`lm_step_loss`, backward, gradient clipping, AdamW), timed part by part:

    data       the next batch: sampler, dataset, cache reads, collate
    forward    lm_step_loss (embedding, substitution, decoder, loss)
    backward   loss.backward()
    optimizer  clip_grad_norm_, AdamW step, zero_grad

FLOPs are counted by torch's FlopCounterMode on one forward + backward (per token, scaled to the
mean step); the achieved rate is printed next to the fp32 matmul peak measured in the same run,
with tokens/s.

    python benchmarks/profile_stages.py --run runs/default            # after the recipe (or make book)
    python benchmarks/profile_stages.py --run runs/default --steps 50 --stages sft
    python benchmarks/profile_stages.py --run runs/default --compile   # eager, then torch.compile
    python benchmarks/profile_stages.py --run runs/default --precision fp32 bf16   # both, one after the other

``--precision`` lists the precisions to time, each on the same batches, one right after the other
(bf16: the products in bfloat16 under autocast, as the trainer runs them where the hardware has
them; see minimind_v/precision.py). The bfloat16 matmul peak is then measured too.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from minimind_v.machine import matmul_gflops
from minimind_v.precision import autocast
from minimind_v.recipe import Recipe, stage_commands, stage_dir
from minimind_v.train.common import lm_step_loss
from minimind_v.train.trainer import StepBatches, make_optimizer, update_weights
from minimind_v.train.vlm import prepare_stage

PARTS = ("data", "forward", "backward", "optimizer")


def stage_flags(run: Path, stage: str, out: Path) -> list[str]:
    """The recipe's flags for the stage, writing into a scratch folder instead of the run's."""
    _, argv = stage_commands(run, Recipe())[stage]
    argv = list(argv)
    argv[argv.index("--out") + 1] = str(out)
    return argv + ["--overwrite"]


def step_flops(model, batch) -> int:
    """FLOPs of one forward + backward, counted by torch (not modelled by hand)."""
    with FlopCounterMode(display=False) as counter:
        loss, extra, _ = lm_step_loss(model, batch)
        (loss + extra).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def profile(run: Path, stage: str, steps: int, warmup: int, compiled: bool = False, precision: str = "fp32") -> dict:
    with tempfile.TemporaryDirectory(prefix=f"profile-{stage}-") as scratch:
        built = prepare_stage(stage, stage_flags(run, stage, Path(scratch) / stage))
    model, dataset, args = built["model"], built["dataset"], built["args"]
    model.train()
    compile_s = None
    optimizer = make_optimizer(model, args.weight_decay, args.lr)  # the trainer's own
    sampler = StepBatches(len(dataset), args.batch_size, 0, 1, args.seed, 0, warmup + steps + 4)
    loader = iter(DataLoader(dataset, batch_sampler=sampler, collate_fn=built["collate"]))
    first = next(loader)
    flops_per_token = step_flops(model, first) / int(first.attention_mask.sum())  # batches vary in length
    if compiled:
        # The decoder blocks through inductor (the loss's boolean indexing stays eager). Batches vary
        # in length, so the first steps compile a static and then a dynamic graph: warm-up covers both.
        for layer in model.layers:
            layer.compile()
        t = time.perf_counter()
        for _ in range(3):
            loss, extra, _ = lm_step_loss(model, next(loader))
            (loss + extra).backward()
        model.zero_grad(set_to_none=True)
        compile_s = time.perf_counter() - t
    times = {part: [] for part in PARTS}
    tokens = []
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        batch = next(loader)
        t1 = time.perf_counter()
        with autocast(batch.input_ids.device, precision):
            loss, extra, _ = lm_step_loss(model, batch)
        t2 = time.perf_counter()
        (loss + extra).backward()
        t3 = time.perf_counter()
        update_weights(model, optimizer, args.grad_clip)
        t4 = time.perf_counter()
        if step >= warmup:
            for part, seconds in zip(PARTS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                times[part].append(seconds)
            tokens.append(int(batch.attention_mask.sum()))
    step_s = sum(sum(v) for v in times.values()) / steps
    flops = flops_per_token * statistics.mean(tokens)  # of a mean step
    label = stage + (" (compiled)" if compiled else "") + (f", {precision}" if precision != "fp32" else "")
    return {"stage": label, "precision": precision, "compile_s": compile_s, "batch": args.batch_size, "tokens": statistics.mean(tokens), "flops": flops,
            "step_ms": 1e3 * step_s, "parts": {p: sum(v) / steps / step_s for p, v in times.items()},
            "tokens_per_s": statistics.mean(tokens) / step_s, "gflops": flops / step_s / 1e9}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/default", help="a run folder the recipe (or make book) filled")
    p.add_argument("--stages", nargs="+", default=["pretrain", "sft"], choices=["pretrain", "sft"])
    p.add_argument("--steps", type=int, default=200, help="timed steps per stage")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--compile", action="store_true",
                   help="also time each stage with its decoder blocks compiled (torch.compile, inductor), right after eager")
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"],
                   help="the precisions to time, one after the other on the same batches (bf16: autocast products)")
    ns = p.parse_args(argv)
    run = Path(ns.run)
    missing = [s for s in ("world", "clip", "llm", "pretrain") if not (stage_dir(run, s) / "complete.json").exists()]
    if missing:
        sys.exit(f"{run} lacks the finished stages {missing}: run `python -m minimind_v.recipe --run {run}` first")
    peak = matmul_gflops()
    peak_bf16 = matmul_gflops(dtype=torch.bfloat16) if "bf16" in ns.precision else None
    rows = [profile(run, stage, ns.steps, ns.warmup, compiled, precision)
            for stage in ns.stages for compiled in ((False, True) if ns.compile else (False,))
            for precision in ns.precision]
    peak_after = matmul_gflops()  # load from elsewhere shows up as a difference between the two
    print(f"\nfp32 matmul peak: {peak:.0f} GFLOP/s before, {peak_after:.0f} after "
          f"(2048², {torch.get_num_threads()} threads); {ns.steps} timed steps per stage")
    if peak_bf16:
        print(f"bf16 matmul peak: {peak_bf16:.0f} GFLOP/s (2048²); % of peak below is of the fp32 peak")
    print()
    print("| stage | batch | tokens/step | ms/step | " + " | ".join(PARTS)
          + " | tokens/s | GFLOP/step | GFLOP/s | % of peak |")
    print("|---|---:|---:|---:|" + "---:|" * len(PARTS) + "---:|---:|---:|---:|")
    for r in rows:
        parts = " | ".join(f"{100 * r['parts'][p]:.0f}%" for p in PARTS)
        print(f"| {r['stage']} | {r['batch']} | {r['tokens']:.0f} | {r['step_ms']:.0f} | {parts} | "
              f"{r['tokens_per_s']:,.0f} | {r['flops'] / 1e9:.2f} | {r['gflops']:.0f} | {100 * r['gflops'] / peak:.0f}% |")
    if len(ns.precision) > 1:
        first = ns.precision[0]
        for r in rows:
            base = next(b for b in rows if b["precision"] == first
                        and b["stage"].split(",")[0] == r["stage"].split(",")[0])
            if r is not base:
                print(f"{r['stage']}: {r['tokens_per_s'] / base['tokens_per_s']:.2f}x the tokens/s of {base['stage']}")
    for eager, compiled in zip(rows[::2], rows[1::2]) if ns.compile and len(ns.precision) == 1 else ():
        speedup = compiled["tokens_per_s"] / eager["tokens_per_s"]  # per token: the timed batches differ
        saved = eager["step_ms"] * (1 - 1 / speedup) / 1e3
        print(f"{eager['stage']}: compiled {speedup:.2f}x eager's tokens/s; "
              f"compiling took {compiled['compile_s']:.0f} s (3 steps), so it pays after "
              + (f"{compiled['compile_s'] / saved:.0f} steps" if saved > 0 else "no number of steps"))


if __name__ == "__main__":
    main()
