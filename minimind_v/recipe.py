"""The default recipe, one command from nothing to answers:

    shapes world -> tiny CLIP -> tokenizer -> text LM -> VLM pretraining -> SFT -> evaluation

    python -m minimind_v.recipe --run runs/default            # the embedded default
    MINIMIND_V_QUICK=1 python -m minimind_v.recipe --run runs/quick   # tiny sizes, a few minutes

Every stage leaves its result in one run folder (layout in ``STAGE_DIRS``). A stage is reused
only when its result is complete (``complete.json``, written last) and was built from the same
settings and the same input stages (``fingerprint.json``); otherwise it is trained again, and
the output says why. An interrupted stage with the same settings resumes from its checkpoint.
Training stages run as their own processes (``python -m minimind_v.train.<stage>``, or under
torchrun with ``--nproc`` > 1), exactly as a reader would launch them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .defaults import FREEZE, TRAINING
from .runfiles import atomic_write_json, clear_complete, is_complete, mark_complete

# run folder layout: stage -> its sub-folder
STAGE_DIRS = {
    "world": "world",
    "clip": "clip",
    "tokenizer": "tokenizer",
    "llm": "llm",
    "pretrain": "pretrain",
    "sft": "sft",
    "eval": "eval",
}
# The stages whose results each stage reads: retraining one of them makes these stale.
STAGE_INPUTS = {
    "world": (),
    "clip": ("world",),
    "tokenizer": ("world",),
    "llm": ("world", "tokenizer"),
    "pretrain": ("world", "llm", "clip"),
    "sft": ("world", "pretrain"),
    "eval": ("world", "pretrain", "sft"),
}
TRAINING_STAGES = ("clip", "llm", "pretrain", "sft")
FINGERPRINT = "fingerprint.json"
# Flags that change when and how often a stage writes, not what it learns.
_NOT_IN_FINGERPRINT = ("--save-every", "--log-every")


@dataclass
class Recipe:
    """Sizes and steps of every stage. The defaults are the book's embedded default."""

    seed: int = 0
    # shapes world
    n_pretrain: int = 20000
    n_sft: int = 20000
    n_eval: int = 1000
    question_types: tuple | None = None  # None: the world's own (shapes.ANSWER_TYPES)
    held_out_pairs: tuple = ()  # colour-shape pairs kept out of training (the seen/unseen split)
    caption_order: str = "random"  # or "reading" (the ablation of chapter 08)
    sft_turns: tuple = (6, 8)  # questions per SFT record, fewest and most
    relation_answers: str = "verdict"  # or "worked", "ordered", "regions" (shapes.RELATION_ANSWERS)
    # tiny CLIP
    clip_steps: int = TRAINING["clip"]["steps"]  # ~3.6 min on 2 CPU cores
    clip_batch: int = TRAINING["clip"]["batch_size"]
    # tokenizer + text LM
    vocab_size: int = 6400
    preset: str = "tiny"
    llm_steps: int = TRAINING["llm"]["steps"]
    # VLM
    pretrain_steps: int = TRAINING["pretrain"]["steps"]
    pretrain_freeze: str = FREEZE["pretrain"]
    sft_steps: int = TRAINING["sft"]["steps"]
    sft_freeze: str = FREEZE["sft"]
    # SFT takes a record with k objects sft_object_repeats[k-1] times an epoch (None: once each)
    sft_object_repeats: tuple | None = None
    mix_captions: float = 0.1
    batch_size: int = TRAINING["sft"]["batch_size"]  # the text LM, pretraining and SFT alike
    sft_batch_size: int | None = None  # SFT's own batch, where it differs (None: batch_size)
    feature_cache: bool = True
    # evaluation
    eval_limit: int | None = None
    save_every: int = 100  # checkpoints every N steps: a rerun after a crash resumes from there
    extra: dict = field(default_factory=dict)  # per-stage extra flags, e.g. {"sft": ["--lr", "5e-4"]}


QUICK = dict(n_pretrain=400, n_sft=400, n_eval=80, clip_steps=30, clip_batch=32, llm_steps=30,
             pretrain_steps=20, sft_steps=30, batch_size=16, eval_limit=80,
             extra={"clip": ["--probe-train", "300", "--probe-test", "200"]})


ROOT = Path(__file__).resolve().parents[1]  # the project root: the package sits in it


def home() -> Path:
    """The folder that holds ``runs/`` and ``figures/``: ``MINIMIND_V_HOME``, else the project root.
    Not the working directory: a chapter opened from notebooks/ and a command run from anywhere
    find the same run folder."""
    chosen = os.environ.get("MINIMIND_V_HOME")
    return ROOT / chosen if chosen else ROOT  # (an absolute path replaces ROOT)


def default_run_folder() -> Path:
    """``MINIMIND_V_RUN`` (relative to home()), else runs/quick in quick mode, else runs/default."""
    chosen = os.environ.get("MINIMIND_V_RUN")
    return home() / (chosen or ("runs/quick" if quick_mode() else "runs/default"))


def quick_mode(environ: Mapping[str, str] | None = None) -> bool:
    """The book's switch for tiny sizes: MINIMIND_V_QUICK=1 (in ``environ``, default this process's)."""
    return (os.environ if environ is None else environ).get("MINIMIND_V_QUICK", "0") not in ("", "0", "false", "False")


# World 2: the five question types plus yes/no existence, questions about absent objects and grid
# relations, with two colour-shape pairs that no training picture shows (the seen/unseen split).
# Eight types share SFT's steps, so each record asks 8-10 questions (world 1: 6-8 about five).
# Two-picture questions ("two_pictures") are a kind the world can ask, not part of world 2.
# SFT, still learning at its end, takes twice the steps at half the batch: the same minutes, twice
# the updates; and it meets a picture of k objects k times an epoch, since lookup, counting and
# relations are hard on busy pictures and one object is answered right nearly always (README,
# Results: what was tried).
WORLD2 = dict(question_types=("colour", "shape", "size", "position", "count", "existence", "absent", "relation"),
              held_out_pairs=(("red", "triangle"), ("blue", "cross")), sft_turns=(8, 10),
              sft_steps=3000, sft_batch_size=16, sft_object_repeats=(1, 2, 3))
# World 1 is the Recipe's defaults for every setting world 2 changes.
WORLDS = {1: {name: getattr(Recipe, name) for name in WORLD2}, 2: WORLD2}


def with_world(r: Recipe, world: int) -> Recipe:
    """``r`` on world ``world`` (``WORLDS``); in quick mode the quick sizes stay."""
    r = replace(r, **WORLDS[world])
    return replace(r, **{k: v for k, v in QUICK.items() if k in WORLDS[world]}) if quick_mode() else r


# Recipe fields added after records of the recipe were written: a record leaves them out while
# they hold their default, so that records of the recipe as it was still match it.
_FIELDS_ADDED_LATER = {"sft_batch_size": None, "relation_answers": "verdict", "sft_object_repeats": None}


def recipe_record(r: Recipe) -> dict:
    """The recipe as record files hold it (tuples become lists), later fields at their default left out."""
    record = json.loads(json.dumps(asdict(r)))
    for name, default in _FIELDS_ADDED_LATER.items():
        if record[name] == default:
            del record[name]
    return record


def default_recipe() -> Recipe:
    """The book's recipe: quick sizes under ``MINIMIND_V_QUICK=1``; the world's and every stage's
    seed from ``MINIMIND_V_SEED`` (default 0); world 2 under ``MINIMIND_V_WORLD=2``."""
    r = replace(Recipe(), **QUICK) if quick_mode() else Recipe()
    seed, world = os.environ.get("MINIMIND_V_SEED", ""), os.environ.get("MINIMIND_V_WORLD", "")
    if seed:
        if not seed.isdigit():
            raise ValueError(f"MINIMIND_V_SEED must be a whole number >= 0, got {seed!r}")
        r = replace(r, seed=int(seed))
    if world:
        if not world.isdigit() or int(world) not in WORLDS:
            raise ValueError(f"MINIMIND_V_WORLD must be one of {sorted(WORLDS)}, got {world!r}")
        r = with_world(r, int(world))
    return r


def stage_dir(run: str | Path, stage: str) -> Path:
    if stage not in STAGE_DIRS:
        raise ValueError(f"unknown stage {stage!r}; the stages are {list(STAGE_DIRS)}")
    return Path(run) / STAGE_DIRS[stage]


def world_config(r: Recipe):
    """The shapes world this recipe trains on."""
    from .data.shapes import ShapesWorldConfig

    config = ShapesWorldConfig(seed=r.seed, n_pretrain=r.n_pretrain, n_sft=r.n_sft, n_eval=r.n_eval,
                               held_out_pairs=tuple(tuple(p) for p in r.held_out_pairs),
                               caption_order=r.caption_order, min_sft_turns=r.sft_turns[0],
                               max_sft_turns=r.sft_turns[1], relation_answers=r.relation_answers)
    if r.question_types is not None:
        config = replace(config, question_types=tuple(r.question_types))
    config.validate()
    return config


def world_texts(world: Path) -> list[str]:
    """Every caption, question and answer of the world as a chat turn shows it ("user\\n..."),
    without the image tags. The role words go in too: otherwise BPE never sees "assistant" and
    spells it letter by letter in every turn of every training sample. Either layout: the JSON
    files, or the original's parquet files (pretrain_i2t.parquet, sft_i2t.parquet), in row order."""
    from .data.layouts import resolve_data
    from .data.parquet import CONVERSATIONS, iter_rows, parse_conversations
    from .tokenizer import SEED_ROLES

    def turns(name: str):  # (role, text) of every turn, record by record
        path, image_dir = resolve_data(world, name)
        if image_dir is not None:  # the JSON layout
            for record in json.loads(path.read_text(encoding="utf-8")):
                yield from ((SEED_ROLES[t["from"]], t["value"]) for t in record["conversations"])
            return
        for _, _, where, rid, row in iter_rows(path, columns=[CONVERSATIONS]):  # only that column is read
            for t in parse_conversations(row[CONVERSATIONS], where, rid):
                yield (t["role"], t["content"]) if "role" in t else (SEED_ROLES[t["from"]], t["value"])

    texts = []
    for name in ("pretrain_data.json", "sft_data.json"):
        texts += [f"{role}\n" + text.replace("<image>", "").strip() for role, text in turns(name)]
    return texts


def stage_commands(run: Path, r: Recipe) -> dict[str, tuple[str, list[str]]]:
    """The module and flags each training stage runs with."""
    world, cache = str(stage_dir(run, "world")), ["--feature-cache"] if r.feature_cache else []
    saves = ["--save-every", str(r.save_every)]
    common = ["--seed", str(r.seed), "--batch-size", str(r.batch_size), *saves]
    sft_common = ["--seed", str(r.seed), "--batch-size", str(r.sft_batch_size or r.batch_size), *saves]
    if r.sft_object_repeats and set(r.sft_object_repeats) != {1}:  # (all ones: every record once, the default)
        sft_common += ["--object-repeats", ",".join(str(n) for n in r.sft_object_repeats)]
    return {
        "clip": ("minimind_v.train.clip", ["--data", world, "--out", str(stage_dir(run, "clip")),
                                            "--steps", str(r.clip_steps), "--batch-size", str(r.clip_batch),
                                            "--seed", str(r.seed), *saves]),
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
            *cache, *sft_common]),
    }


# ----------------------------------------------------------------------------- reuse by fingerprint


def stage_settings(r: Recipe, stage: str, nproc: int = 1) -> dict:
    """What decides a stage's result, with the run folder written as ``<run>`` so that a moved
    run folder keeps its fingerprints."""
    if stage == "world":
        config = asdict(world_config(r))
        # Settings added after run folders existed leave their fingerprints as they were while
        # they hold their default.
        for name, default in _WORLD_SETTINGS_ADDED_LATER.items():
            if config[name] == default:
                del config[name]
        return {"config": config}
    if stage == "tokenizer":
        return {"vocab_size": r.vocab_size}
    if stage == "eval":  # questions written before their picture are asked with it moved in front
        return {"eval_limit": r.eval_limit, "asked": "picture first"}
    module, argv = stage_commands(Path("<run>"), r)[stage]
    flags = _flags_dict(argv + r.extra.get(stage, []))
    # Processes split the global batch: 2 processes of batch B learn like one of batch 2B.
    return {"module": module, "processes": nproc,
            "flags": {k: v for k, v in flags.items() if k not in _NOT_IN_FINGERPRINT}}


_WORLD_SETTINGS_ADDED_LATER = {"caption_order": "random", "relation_answers": "verdict"}


def _flags_dict(argv: list[str]) -> dict[str, str | bool]:
    """["--steps", "30", "--feature-cache"] -> {"--steps": "30", "--feature-cache": True}."""
    flags, i = {}, 0
    while i < len(argv):
        takes_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
        flags[argv[i]] = argv[i + 1] if takes_value else True
        i += 2 if takes_value else 1
    return flags


def _digest(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def stage_fingerprints(r: Recipe, nproc: int = 1) -> dict[str, dict]:
    """{stage: {"fingerprint", "settings", "inputs": {input stage: its fingerprint}}}: a stage's
    fingerprint covers its own settings and, through its inputs', everything it was built from."""
    table: dict[str, dict] = {}
    for stage in STAGE_DIRS:  # in order: every input comes before the stages that read it
        settings = stage_settings(r, stage, nproc)
        inputs = {name: table[name]["fingerprint"] for name in STAGE_INPUTS[stage]}
        table[stage] = {"fingerprint": _digest({"stage": stage, "settings": settings, "inputs": inputs}),
                        "settings": settings, "inputs": inputs}
    return table


@dataclass
class StageStatus:
    stage: str
    reuse: bool  # the finished result is there, built from the same settings and inputs
    resume: bool  # an earlier run with the same fingerprint stopped before it finished
    reason: str


def _read_fingerprint(folder: Path) -> dict | None:
    try:
        recorded = json.loads((folder / FINGERPRINT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) and "fingerprint" in recorded else None


def _differences(old, new, prefix: str = "") -> list[str]:
    """Readable differences between two settings dicts: ["--steps 1500 -> 100", ...]."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, "(unset)"), new.get(key, "(unset)")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, prefix)
        elif a != b:
            out.append(f"{prefix}{key} {a} -> {b}")
    return out


def stage_status(run: str | Path, r: Recipe, stage: str, nproc: int = 1,
                 fingerprints: dict | None = None) -> StageStatus:
    """Whether the stage's folder can be reused, and why (or why not)."""
    folder = stage_dir(run, stage)
    wanted = (fingerprints or stage_fingerprints(r, nproc))[stage]
    recorded = _read_fingerprint(folder)
    complete = is_complete(folder)
    if recorded is None:
        reason = ("its folder holds a result from before fingerprints were kept" if complete
                  else "no result yet")
        return StageStatus(stage, False, False, reason)
    if recorded["fingerprint"] == wanted["fingerprint"]:
        if complete:
            return StageStatus(stage, True, False, "same settings and inputs")
        return StageStatus(stage, False, stage in TRAINING_STAGES,
                           "an earlier run with the same settings stopped before it finished")
    changed = _differences(recorded.get("settings", {}), wanted["settings"])
    retrained = [name for name, fp in wanted["inputs"].items() if recorded.get("inputs", {}).get(name) != fp]
    parts = []
    if changed:
        parts.append("settings changed: " + ", ".join(changed))
    if retrained:
        parts.append("built from another " + " / ".join(retrained) + " than the one now in the run folder")
    return StageStatus(stage, False, False, "; ".join(parts) or "its fingerprint differs")


def is_done(run: str | Path, stage: str, recipe: Recipe | None = None, nproc: int = 1) -> bool:
    """The stage's finished result is there and was built with ``recipe``'s settings."""
    return stage_status(run, recipe or default_recipe(), stage, nproc).reuse


def run_stage(run: str | Path, r: Recipe | None = None, stage: str = "world", nproc: int = 1,
              plot: bool = True, fingerprints: dict | None = None):
    """Reuse the stage when its fingerprint matches, else build it (resuming an interrupted run of
    the same settings); says which and why. Returns None when the stage was reused, else what
    building it gave: the world's summary, the tokenizer, a training stage's launch result, or
    the evaluation figures."""
    from .data.shapes import generate_world
    from .launch import run_torchrun
    from .tokenizer import train_tokenizer

    run, r = Path(run), r or default_recipe()
    fingerprints = fingerprints or stage_fingerprints(r, nproc)
    status = stage_status(run, r, stage, nproc, fingerprints)
    folder = stage_dir(run, stage)
    if status.reuse:
        print(f"[{stage}] reusing {folder}: {status.reason}", flush=True)
        return None
    verb = "resuming" if status.resume else ("training" if stage in TRAINING_STAGES else "building")
    print(f"[{stage}] {verb} {folder}: {status.reason}", flush=True)
    # Withdraw the old result's mark before anything changes, then say what is being built.
    folder.mkdir(parents=True, exist_ok=True)
    clear_complete(folder)
    atomic_write_json(folder / FINGERPRINT, fingerprints[stage])
    result = None
    if stage == "world":
        result = generate_world(folder, world_config(r), overwrite=True)
        mark_complete(folder, {"stage": stage})
    elif stage == "tokenizer":
        result = train_tokenizer(world_texts(stage_dir(run, "world")), out_dir=folder, vocab_size=r.vocab_size)
        print(f"tokenizer: {len(result)} tokens")
        mark_complete(folder, {"stage": stage})
    elif stage == "eval":
        from .evaluate import evaluate_run

        result = evaluate_run(run, r)
        mark_complete(folder, {"stage": stage})
    else:
        module, args = stage_commands(run, r)[stage]
        mode = ["--resume"] if status.resume else ["--overwrite"]
        result = run_torchrun(module, args + r.extra.get(stage, []) + mode, nproc=nproc,
                              use_torchrun=nproc > 1, plot=plot)
        if not is_complete(folder):
            raise RuntimeError(f"[{stage}] the training process ended without marking {folder} complete")
    return result


def run_recipe(run: str | Path, recipe: Recipe | None = None, nproc: int = 1,
               stages: list[str] | None = None) -> dict:
    """Run (or reuse) every stage; returns {stage: seconds} plus the evaluation figures."""
    run, r = Path(run), recipe or default_recipe()
    run.mkdir(parents=True, exist_ok=True)
    fingerprints = stage_fingerprints(r, nproc)
    timings, figures, reused = {}, None, []
    for stage in stages or list(STAGE_DIRS):
        t0 = time.perf_counter()
        result = run_stage(run, r, stage, nproc, plot=False, fingerprints=fingerprints)
        if result is None:
            reused.append(stage)
            continue
        if stage == "eval":
            figures = result
        timings[stage] = round(time.perf_counter() - t0, 1)
        print(f"[{stage}] finished in {timings[stage]:.0f} s", flush=True)
    # What the run folder now holds: the settings of this recipe, which every stage matches.
    atomic_write_json(run / "recipe.json", {"recipe": recipe_record(r), "processes": nproc,
                                            "fingerprints": {k: v["fingerprint"] for k, v in fingerprints.items()}})
    total = sum(timings.values())
    print(f"recipe: {len(timings)} stage(s) run in {total / 60:.1f} min"
          + (f", {len(reused)} reused ({', '.join(reused)})" if reused else "") + f"; run folder {run}")
    if timings:
        with open(run / "timings.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(timings) + "\n")
    return {"timings": timings, "figures": figures, "reused": reused}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=None,
                   help="run folder (default: $MINIMIND_V_RUN, else runs/default or runs/quick in the project root)")
    p.add_argument("--nproc", type=int, default=1, help="processes per training stage (torchrun if > 1)")
    p.add_argument("--seed", type=int, default=None,
                   help="the world's and every stage's seed (default: the recipe's, 0); stages change with it")
    p.add_argument("--world", type=int, choices=sorted(WORLDS), default=None,
                   help="1: the five question types; 2: plus existence, absent objects, relations, two "
                        "pictures and held-out colour-shape pairs (default: $MINIMIND_V_WORLD, else 1)")
    p.add_argument("--stages", nargs="*", choices=list(STAGE_DIRS), help="only these stages")
    ns = p.parse_args(argv)
    if ns.nproc < 1:
        p.error(f"--nproc must be at least 1, got {ns.nproc}")
    r = default_recipe()
    if ns.world is not None:
        r = with_world(r, ns.world)
    if ns.seed is not None:
        if ns.seed < 0:
            p.error(f"--seed must be >= 0, got {ns.seed}")
        r = replace(r, seed=ns.seed)
    run_recipe(ns.run or default_run_folder(), r, nproc=ns.nproc, stages=ns.stages)


if __name__ == "__main__":
    main()
