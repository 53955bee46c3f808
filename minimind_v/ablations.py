"""What made it work: the recipe against itself with one choice changed, run by run.

    python -m minimind_v.ablations                          # every ablation, into runs/default_ablations
    python -m minimind_v.ablations --only caption_order     # some of them
    python -m minimind_v.ablations --record docs/ablations.json   # also keep the table there
    MINIMIND_V_QUICK=1 python -m minimind_v.ablations       # tiny sizes (what the tests run)

Each ablation is a pair: the recipe, and the recipe with one choice changed (``ABLATIONS``), both
trained from nothing at ``ABLATION_STEPS`` (fewer steps than the book's run: the effects show at
that size, and a pair costs minutes, not half an hour) and evaluated on the same held-out
questions. Every run is an ordinary recipe run folder, so a stage is reused when its fingerprint
matches and trained otherwise; stages a variant shares with the recipe (the same world, the same
tiny CLIP...) are hard-linked from the recipe's run instead of trained again, and the recipe's
own run borrows in the same way from the book's run folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from .recipe import (STAGE_DIRS, Recipe, default_recipe, default_run_folder, quick_mode, recipe_record, run_recipe,
                     stage_dir, stage_fingerprints, stage_status)
from .runfiles import atomic_write_json

RESULTS = "results.json"
RECIPE_RUN = "recipe"  # the sub-folder of the recipe's own run among the variants
# The ablation size: the book's recipe with fewer VLM steps (its world, CLIP and text LM as they are).
ABLATION_STEPS = dict(pretrain_steps=400, sft_steps=500)


@dataclass(frozen=True)
class Ablation:
    name: str  # its run folder and its --only name
    choice: str  # what is being decided
    recipe_value: str  # what the recipe does
    variant_value: str  # what the variant does instead
    changes: dict = field(default_factory=dict)  # Recipe fields the variant replaces
    extra: dict = field(default_factory=dict)  # per-stage flags the variant adds


ABLATIONS = (
    Ablation("caption_order", "caption object order", "random order", "reading order",
             changes=dict(caption_order="reading")),
    Ablation("questions_per_record", "questions per SFT record", "6-8", "1", changes=dict(sft_turns=(1, 1))),
    Ablation("sft_trains_projection", "what SFT trains", "projection + whole decoder", "projection only",
             changes=dict(sft_freeze="proj")),
    Ablation("sft_trains_ends", "what SFT trains", "projection + whole decoder",
             "projection + first and last layers", changes=dict(sft_freeze="ends")),
    Ablation("cls_only", "tokens per picture", "all 50 (CLS + 49 patches)", "the CLS token in every place",
             extra={"pretrain": ["--vision-tokens", "cls"]}),
    Ablation("mlp_projector", "projector", "linear", "MLP (two layers, GELU)",
             extra={"pretrain": ["--projector", "mlp"]}),
    Ablation("clip_without_aux", "tiny CLIP's training", "contrastive + auxiliary loss (weight 10)",
             "contrastive loss only", extra={"clip": ["--aux-weight", "0"]}),
    Ablation("moe", "decoder feed-forward", "dense SwiGLU", "mixture of experts (4 routed, top 2, + 1 shared)",
             extra={"llm": ["--use-moe"]}),
)
BY_NAME = {a.name: a for a in ABLATIONS}


def ablation_recipe() -> Recipe:
    """The recipe every pair starts from: the book's (its seed and world from the environment), at
    ``ABLATION_STEPS``; in quick mode the book's quick sizes as they are."""
    r = default_recipe()
    return r if quick_mode() else replace(r, **ABLATION_STEPS)


def variant_recipe(base: Recipe, ablation: Ablation) -> Recipe:
    extra = {stage: list(base.extra.get(stage, [])) + list(flags) for stage, flags in ablation.extra.items()}
    return replace(base, **ablation.changes, extra={**base.extra, **extra})


def default_folder() -> Path:
    """Beside the book's run folder: runs/default -> runs/default_ablations (runs/quick_ablations)."""
    run = default_run_folder()
    return run.parent / f"{run.name}_ablations"


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # same bytes, no space: nothing in a finished stage is rewritten in place
    except OSError:
        shutil.copy2(src, dst)  # another file system


def borrow_stages(source: Path, run: Path, r: Recipe) -> list[str]:
    """Hard-link into ``run`` every stage that ``source`` holds finished with ``r``'s fingerprint
    and ``run`` does not; returns the stages borrowed."""
    fingerprints = stage_fingerprints(r)
    borrowed = []
    for stage in STAGE_DIRS:
        if stage_status(run, r, stage, fingerprints=fingerprints).reuse:
            continue
        if not source.is_dir() or not stage_status(source, r, stage, fingerprints=fingerprints).reuse:
            continue
        target = stage_dir(run, stage)
        if target.exists():
            shutil.rmtree(target)  # an unfinished or outdated result of this ablation run
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(stage_dir(source, stage), target, copy_function=_link_or_copy, symlinks=True)
        borrowed.append(stage)
    return borrowed


def _accuracy(run: Path) -> dict:
    """The held-out figures of a finished run, its commonest answers, the last training loss of its
    VLM stages, and what its tiny CLIP's probes read from the token under each object's centre."""
    results = json.loads((stage_dir(run, "eval") / "results.json").read_text(encoding="utf-8"))
    clip = json.loads((stage_dir(run, "clip") / "complete.json").read_text(encoding="utf-8"))["summary"]
    probe = clip.get("probe", {}).get("trained", {}).get("centre")
    answers = json.loads((stage_dir(run, "eval") / "answers.json").read_text(encoding="utf-8"))
    commonest = Counter(row["prediction"] for row in answers).most_common(3)
    losses = {stage: json.loads((stage_dir(run, stage) / "complete.json").read_text(encoding="utf-8"))
              .get("summary", {}).get("final_loss") for stage in ("pretrain", "sft")}
    return {"overall": results["overall"], "per_type": results["per_type"], "n": results["n"],
            "commonest_answers": commonest, "final_loss": losses,
            "clip": {"retrieval_top1": clip.get("retrieval_top1"), "probe_centre": probe}}


def _train(run: Path, r: Recipe, sources: list[Path], nproc: int, earlier: dict | None = None) -> dict:
    """One run of the recipe ``r`` in ``run``, borrowing what ``sources`` already hold. A run that
    only reused finished stages keeps the minutes ``earlier`` (its entry in the table) measured."""
    run.mkdir(parents=True, exist_ok=True)
    for source in sources:
        borrowed = borrow_stages(source, run, r)
        if borrowed:
            print(f"[ablations] {run.name}: borrowed {', '.join(borrowed)} from {source}", flush=True)
    started = time.perf_counter()
    outcome = run_recipe(run, r, nproc=nproc)
    if not outcome["timings"] and earlier and "minutes" in earlier:
        return {**_accuracy(run), "minutes": earlier["minutes"], "stages_trained": earlier.get("stages_trained", [])}
    return {**_accuracy(run), "minutes": round((time.perf_counter() - started) / 60, 2),
            "stages_trained": sorted(outcome["timings"])}


def read_results(folder: Path | None = None) -> dict | None:
    path = Path(folder or default_folder()) / RESULTS
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError as err:
        raise ValueError(f"{path} is not a results table written by minimind_v.ablations ({err}); "
                         f"remove it to start the table again") from None


def run_ablations(names: list[str] | None = None, folder: Path | None = None, nproc: int = 1,
                  record: Path | None = None) -> dict:
    """Train (or reuse) the recipe's run and each asked ablation's variant; the table grows in
    ``folder/results.json`` as each pair finishes (and in ``record`` too, if given)."""
    from .machine import describe_speed

    folder = Path(folder or default_folder())
    chosen = [BY_NAME[n] for n in names] if names else list(ABLATIONS)
    base = ablation_recipe()
    results = read_results(folder) or {}
    settings = recipe_record(base)  # as the file holds them (tuples become lists)
    if results.get("recipe", {}).get("settings") != settings:
        results = {}  # measured with other settings: start the table again
    results.update(machine=describe_speed(), quick=quick_mode())
    base_run = folder / RECIPE_RUN
    print(f"[ablations] the recipe at {'quick sizes' if quick_mode() else ABLATION_STEPS} -> {base_run}", flush=True)
    results["recipe"] = {"settings": settings, **_train(base_run, base, [default_run_folder()], nproc,
                                                        results.get("recipe"))}
    rows = results.setdefault("ablations", {})
    for ablation in chosen:
        print(f"[ablations] {ablation.name}: {ablation.choice}: {ablation.variant_value} "
              f"instead of {ablation.recipe_value}", flush=True)
        variant = _train(folder / ablation.name, variant_recipe(base, ablation), [base_run], nproc,
                         rows.get(ablation.name, {}).get("variant"))
        rows[ablation.name] = {"choice": ablation.choice, "recipe_value": ablation.recipe_value,
                               "variant_value": ablation.variant_value, "variant": variant}
        atomic_write_json(folder / RESULTS, results)
        if record is not None:
            atomic_write_json(Path(record), results)
    atomic_write_json(folder / RESULTS, results)
    if record is not None:
        atomic_write_json(Path(record), results)
    return results


def standard_error(p: float, n: int) -> float:
    """The binomial standard error of an accuracy p measured on n questions."""
    return (p * (1 - p) / n) ** 0.5


def table_rows(results: dict) -> list[dict]:
    """One row per ablation in ``ABLATIONS`` order: overall and per-type accuracy of the recipe and
    the variant, the difference, and whether it exceeds twice its standard error."""
    recipe = results["recipe"]
    rows = []
    for ablation in ABLATIONS:
        if ablation.name not in results.get("ablations", {}):
            continue
        entry = results["ablations"][ablation.name]
        variant = entry["variant"]
        delta = variant["overall"] - recipe["overall"]
        noise = (standard_error(recipe["overall"], recipe["n"]) ** 2
                 + standard_error(variant["overall"], variant["n"]) ** 2) ** 0.5
        rows.append({"name": ablation.name, "choice": entry["choice"], "recipe_value": entry["recipe_value"],
                     "variant_value": entry["variant_value"], "recipe": recipe["overall"],
                     "variant": variant["overall"], "delta": delta, "beyond_noise": abs(delta) > 2 * noise,
                     "per_type": {k: (recipe["per_type"][k], variant["per_type"].get(k))
                                  for k in recipe["per_type"]},
                     "minutes": variant["minutes"]})
    return rows


def table_markdown(results: dict) -> str:
    rows = table_rows(results)
    types = list(results["recipe"]["per_type"])
    head = ("| choice | the recipe | instead | overall, recipe → variant | " + " | ".join(types)
            + " | minutes |\n|---|---|---|---:|" + "---:|" * len(types) + "---:|")
    lines = [head]
    for row in rows:
        sign = "" if row["beyond_noise"] else " (within noise)"
        per_type = " | ".join(f"{100 * a:.1f} → {100 * b:.1f}" for a, b in row["per_type"].values())
        lines.append(f"| {row['choice']} | {row['recipe_value']} | {row['variant_value']} | "
                     f"{100 * row['recipe']:.1f} → **{100 * row['variant']:.1f}** ({100 * row['delta']:+.1f}){sign} | "
                     f"{per_type} | {row['minutes']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=list(BY_NAME), help="these ablations (default: all)")
    p.add_argument("--folder", default=None, help="where the runs go (default: beside the book's run folder)")
    p.add_argument("--nproc", type=int, default=1, help="processes per training stage (torchrun if > 1)")
    p.add_argument("--record", default=None, help="also write the results table (JSON) to this file")
    ns = p.parse_args(argv)
    if ns.nproc < 1:
        p.error(f"--nproc must be at least 1, got {ns.nproc}")
    results = run_ablations(ns.only, Path(ns.folder) if ns.folder else None, ns.nproc,
                            Path(ns.record) if ns.record else None)
    print(f"\nrecipe at these sizes: {100 * results['recipe']['overall']:.1f}% held-out accuracy; "
          f"{results['machine']}\n")
    print(table_markdown(results))
    return results


if __name__ == "__main__":
    main()
