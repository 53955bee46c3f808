"""The default recipe, one command from nothing to answers:

    shapes world -> tiny CLIP -> tokenizer -> text LM -> VLM pretraining -> SFT -> evaluation

    python -m minimind_v.recipe --run runs/default            # the embedded default
    MINIMIND_V_QUICK=1 python -m minimind_v.recipe --run runs/quick   # tiny sizes, a few minutes

Every stage leaves its result in one run folder (layout in ``STAGE_DIRS``) and is skipped when
that result is already there, so a second run reuses finished stages. Training stages run as
their own processes (``python -m minimind_v.train.<stage>``, or under torchrun with
``--nproc`` > 1), exactly as a reader would launch them.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

# run folder layout: stage -> (sub-folder, the file whose presence means "finished")
STAGE_DIRS = {
    "world": ("world", "world.json"),
    "clip": ("clip", "preprocessor_config.json"),
    "tokenizer": ("tokenizer", "tokenizer.json"),
    "llm": ("llm", "model.safetensors"),
    "pretrain": ("pretrain", "model.safetensors"),
    "sft": ("sft", "model.safetensors"),
    "eval": ("eval", "results.json"),
}


@dataclass
class Recipe:
    """Sizes and steps of every stage. The defaults are the book's embedded default."""

    seed: int = 0
    # shapes world
    n_pretrain: int = 20000
    n_sft: int = 20000
    n_eval: int = 1000
    # tiny CLIP
    clip_steps: int = 1000  # ~3.6 min on 2 CPU cores
    clip_batch: int = 64
    # tokenizer + text LM
    vocab_size: int = 6400
    preset: str = "tiny"
    llm_steps: int = 300
    # VLM
    pretrain_steps: int = 1000
    pretrain_freeze: str = "all"
    sft_steps: int = 1500
    sft_freeze: str = "all"
    mix_captions: float = 0.1
    batch_size: int = 32
    feature_cache: bool = True
    # evaluation
    eval_limit: int | None = None
    extra: dict = field(default_factory=dict)  # per-stage extra flags, e.g. {"sft": ["--lr", "5e-4"]}


QUICK = dict(n_pretrain=400, n_sft=400, n_eval=80, clip_steps=30, clip_batch=32, llm_steps=30,
             pretrain_steps=20, sft_steps=30, batch_size=16, eval_limit=80,
             extra={"clip": ["--probe-train", "300", "--probe-test", "200"]})


def quick_mode() -> bool:
    """The book's switch for tiny sizes: MINIMIND_V_QUICK=1."""
    return os.environ.get("MINIMIND_V_QUICK", "0") not in ("", "0", "false", "False")


def default_recipe() -> Recipe:
    return replace(Recipe(), **QUICK) if quick_mode() else Recipe()


def stage_dir(run: str | Path, stage: str) -> Path:
    return Path(run) / STAGE_DIRS[stage][0]


def is_done(run: str | Path, stage: str) -> bool:
    return (stage_dir(run, stage) / STAGE_DIRS[stage][1]).exists()


def world_texts(world: Path) -> list[str]:
    """Every caption, question and answer of the world as a chat turn shows it ("user\\n..."),
    without the image tags. The role words go in too: otherwise BPE never sees "assistant" and
    spells it letter by letter in every turn of every training sample."""
    from .tokenizer import SEED_ROLES

    texts = []
    for name in ("pretrain_data.json", "sft_data.json"):
        for record in json.loads((world / name).read_text(encoding="utf-8")):
            texts += [f"{SEED_ROLES[t['from']]}\n" + t["value"].replace("<image>", "").strip()
                      for t in record["conversations"]]
    return texts


def stage_commands(run: Path, r: Recipe) -> dict[str, tuple[str, list[str]]]:
    """The module and flags each training stage runs with."""
    world, cache = str(stage_dir(run, "world")), ["--feature-cache"] if r.feature_cache else []
    common = ["--seed", str(r.seed), "--batch-size", str(r.batch_size)]
    return {
        "clip": ("minimind_v.train.clip", ["--data", world, "--out", str(stage_dir(run, "clip")),
                                            "--steps", str(r.clip_steps), "--batch-size", str(r.clip_batch),
                                            "--seed", str(r.seed)]),
        "llm": ("minimind_v.train.llm", ["--data", world, "--tokenizer", str(stage_dir(run, "tokenizer")),
                                          "--out", str(stage_dir(run, "llm")), "--preset", r.preset,
                                          "--steps", str(r.llm_steps), *common]),
        "pretrain": ("minimind_v.train.pretrain_vlm", [
            "--data", world, "--init", str(stage_dir(run, "llm")), "--vision", str(stage_dir(run, "clip")),
            "--out", str(stage_dir(run, "pretrain")), "--steps", str(r.pretrain_steps),
            "--freeze", r.pretrain_freeze, *cache, *common]),
        "sft": ("minimind_v.train.sft_vlm", [
            "--data", world, "--init", str(stage_dir(run, "pretrain")), "--out", str(stage_dir(run, "sft")),
            "--steps", str(r.sft_steps), "--freeze", r.sft_freeze, "--mix-captions", str(r.mix_captions),
            *cache, *common]),
    }


def evaluate_run(run: Path, r: Recipe) -> dict:
    """Held-out accuracy per answer type (with the text-only baseline) and the demo table."""
    from .evaluate import DEMO_IMAGES, demo_table, evaluate_vqa, format_demo_table, format_table
    from .inference import load_vlm

    world = stage_dir(run, "world")
    sft = load_vlm(stage_dir(run, "sft"))
    result = evaluate_vqa(sft, world, limit=r.eval_limit)
    baseline = evaluate_vqa(sft, world, limit=r.eval_limit, with_image=False)
    pretrain = load_vlm(stage_dir(run, "pretrain"))
    demo = demo_table({"pretrain": pretrain, "sft": sft}, world / DEMO_IMAGES)
    out = stage_dir(run, "eval")
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(result, baseline)
    (out / "table.md").write_text(table + "\n\n" + format_demo_table(demo) + "\n", encoding="utf-8")
    (out / "answers.json").write_text(json.dumps(result["rows"], indent=1), encoding="utf-8")
    figures = {"overall": result["overall"], "per_type": result["per_type"], "n": result["n"],
               "text_only_baseline": {"overall": baseline["overall"], "per_type": baseline["per_type"]},
               "answers_per_s": result["answers_per_s"], "demo": demo}
    (out / "results.json").write_text(json.dumps(figures, indent=2), encoding="utf-8")
    print(table)
    return figures


def run_recipe(run: str | Path, recipe: Recipe | None = None, nproc: int = 1,
               stages: list[str] | None = None) -> dict:
    """Run (or reuse) every stage; returns {stage: seconds} plus the evaluation figures."""
    from .data.shapes import ShapesWorldConfig, generate_world
    from .launch import run_torchrun
    from .tokenizer import train_tokenizer

    run, r = Path(run), recipe or default_recipe()
    run.mkdir(parents=True, exist_ok=True)
    (run / "recipe.json").write_text(json.dumps(asdict(r), indent=2), encoding="utf-8")
    commands = stage_commands(run, r)
    timings, figures = {}, None
    for stage in stages or list(STAGE_DIRS):
        if is_done(run, stage):
            print(f"[{stage}] already done in {stage_dir(run, stage)}: reusing it", flush=True)
            continue
        print(f"[{stage}] starting", flush=True)
        t0 = time.perf_counter()
        if stage == "world":
            generate_world(stage_dir(run, "world"), ShapesWorldConfig(
                seed=r.seed, n_pretrain=r.n_pretrain, n_sft=r.n_sft, n_eval=r.n_eval), overwrite=True)
        elif stage == "tokenizer":
            tok = train_tokenizer(world_texts(stage_dir(run, "world")), out_dir=stage_dir(run, "tokenizer"),
                                  vocab_size=r.vocab_size)
            print(f"tokenizer: {len(tok)} tokens")
        elif stage == "eval":
            figures = evaluate_run(run, r)
        else:
            module, args = commands[stage]
            run_torchrun(module, args + r.extra.get(stage, []), nproc=nproc,
                         use_torchrun=nproc > 1, plot=False)
        timings[stage] = round(time.perf_counter() - t0, 1)
        print(f"[{stage}] finished in {timings[stage]:.0f} s", flush=True)
    total = sum(timings.values())
    print(f"recipe: {len(timings)} stage(s) run in {total / 60:.1f} min; run folder {run}")
    if timings:
        with open(run / "timings.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(timings) + "\n")
    return {"timings": timings, "figures": figures}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/quick" if quick_mode() else "runs/default", help="run folder")
    p.add_argument("--nproc", type=int, default=1, help="processes per training stage (torchrun if > 1)")
    p.add_argument("--stages", nargs="*", choices=list(STAGE_DIRS), help="only these stages")
    ns = p.parse_args(argv)
    run_recipe(ns.run, nproc=ns.nproc, stages=ns.stages)


if __name__ == "__main__":
    main()
