"""The recipe reuses a stage only when its result is complete and was built from the same settings
and the same input stages; otherwise it builds the stage again and says why.

The world and tokenizer stages really run (tiny sizes, seconds). The training stages' launcher is
replaced by a recorder that writes what a finished training leaves (complete.json), so these tests
check the decisions (train, reuse, resume, retrain) without training; the quick-book test in
test_book.py runs the real ones.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from minimind_v import recipe as recipe_module
from minimind_v.recipe import (FINGERPRINT, QUICK, Recipe, is_done, run_recipe, run_stage, stage_dir, world_config,
                               stage_fingerprints, stage_status)
from minimind_v.runfiles import COMPLETE, is_complete, mark_complete

SMALL = dict(n_pretrain=40, n_sft=40, n_eval=16, vocab_size=300)


@pytest.fixture
def launches(monkeypatch):
    """Replace the training launcher: record each launch's flags and mark the stage complete."""
    calls = []

    def fake_run_torchrun(module, args, nproc=1, use_torchrun=False, plot=True):
        out = Path(args[args.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        calls.append({"module": module, "args": list(args), "out": out.name})
        mark_complete(out, {"module": module})
        return "launched"

    monkeypatch.setattr("minimind_v.launch.run_torchrun", fake_run_torchrun)
    return calls


def changed_stages(a: Recipe, b: Recipe) -> set[str]:
    fa, fb = stage_fingerprints(a), stage_fingerprints(b)
    return {stage for stage in fa if fa[stage]["fingerprint"] != fb[stage]["fingerprint"]}


def test_a_changed_setting_changes_its_stage_and_every_stage_built_from_it():
    base = Recipe(**SMALL)
    assert changed_stages(base, base) == set()
    assert changed_stages(base, replace(base, sft_steps=100)) == {"sft", "eval"}
    assert changed_stages(base, replace(base, pretrain_freeze="proj")) == {"pretrain", "sft", "eval"}
    assert changed_stages(base, replace(base, clip_steps=10)) == {"clip", "pretrain", "sft", "eval"}
    assert changed_stages(base, replace(base, vocab_size=500)) == {"tokenizer", "llm", "pretrain", "sft", "eval"}
    assert changed_stages(base, replace(base, seed=1)) == set(recipe_module.STAGE_DIRS)
    assert changed_stages(base, replace(base, held_out_pairs=(("red", "circle"),))) == set(recipe_module.STAGE_DIRS)
    assert changed_stages(base, replace(base, extra={"sft": ["--projector", "mlp"]})) == {"sft", "eval"}
    assert changed_stages(base, replace(base, sft_object_repeats=(1, 2, 3))) == {"sft", "eval"}
    assert changed_stages(base, replace(base, caption_order="reading")) == set(recipe_module.STAGE_DIRS)
    assert changed_stages(base, replace(base, sft_turns=(1, 1))) == set(recipe_module.STAGE_DIRS)
    # How often a stage saves does not change what it learns; how many processes share a batch does.
    assert changed_stages(base, replace(base, save_every=7)) == set()
    two = stage_fingerprints(base, nproc=2)
    one = stage_fingerprints(base, nproc=1)
    assert {s for s in one if one[s]["fingerprint"] != two[s]["fingerprint"]} == {"clip", "llm", "pretrain", "sft", "eval"}


def test_fingerprints_do_not_depend_on_where_the_run_folder_is(tmp_path):
    r = Recipe(**SMALL)
    assert stage_fingerprints(r) == stage_fingerprints(r)
    # The settings hold "<run>", never a real path.
    assert "<run>/world" in json.dumps(stage_fingerprints(r)["pretrain"]["settings"])


def test_world_and_tokenizer_are_built_once_then_reused(tmp_path, capsys):
    r = Recipe(**SMALL)
    run = tmp_path / "run"
    for stage in ("world", "tokenizer"):
        run_stage(run, r, stage)
    out = capsys.readouterr().out
    assert "[world] building" in out and "[tokenizer] building" in out and "no result yet" in out
    assert is_complete(stage_dir(run, "world")) and is_complete(stage_dir(run, "tokenizer"))
    before = (stage_dir(run, "tokenizer") / "tokenizer.json").stat().st_mtime_ns

    for stage in ("world", "tokenizer"):
        assert run_stage(run, r, stage) is None
    out = capsys.readouterr().out
    assert f"[tokenizer] reusing {stage_dir(run, 'tokenizer')}: same settings and inputs" in out
    assert (stage_dir(run, "tokenizer") / "tokenizer.json").stat().st_mtime_ns == before

    # A changed knob retrains its stage and names the knob.
    smaller = replace(r, vocab_size=280)
    run_stage(run, smaller, "tokenizer")
    assert "[tokenizer] building" in capsys.readouterr().out
    assert stage_status(run, r, "tokenizer").reason == "settings changed: vocab_size 280 -> 300"

    # A retrained world makes the tokenizer stale, and the reason names the world.
    reseeded = replace(smaller, seed=3)
    run_stage(run, reseeded, "world")
    status = stage_status(run, reseeded, "tokenizer")
    assert not status.reuse and "built from another world" in status.reason


def test_training_stages_train_reuse_resume_and_retrain_by_fingerprint(tmp_path, launches, capsys):
    r = Recipe(**SMALL)
    run = tmp_path / "run"
    first = run_recipe(run, r, stages=["world", "tokenizer", "clip", "llm", "pretrain"])
    assert first["reused"] == [] and list(first["timings"]) == ["world", "tokenizer", "clip", "llm", "pretrain"]
    assert [c["out"] for c in launches] == ["clip", "llm", "pretrain"]
    assert all("--overwrite" in c["args"] and "--resume" not in c["args"] for c in launches)

    # Everything reused: nothing launched, and the output says so.
    result = run_recipe(run, r, stages=["world", "tokenizer", "clip", "llm", "pretrain"])
    assert len(launches) == 3 and result["reused"] == ["world", "tokenizer", "clip", "llm", "pretrain"]
    assert "[pretrain] reusing" in capsys.readouterr().out

    # A run killed before it finished (no complete.json) with the same settings resumes.
    (stage_dir(run, "pretrain") / COMPLETE).unlink()
    run_stage(run, r, "pretrain")
    assert "--resume" in launches[-1]["args"] and launches[-1]["out"] == "pretrain"
    assert "stopped before it finished" in capsys.readouterr().out

    # A changed flag retrains from scratch, naming the flag; the stages after it follow.
    fewer = replace(r, pretrain_steps=7)
    assert not is_done(run, "pretrain", fewer)
    assert "--steps 1000 -> 7" in stage_status(run, fewer, "pretrain").reason
    run_stage(run, fewer, "pretrain")
    assert "--overwrite" in launches[-1]["args"]
    assert is_done(run, "pretrain", fewer) and not is_done(run, "pretrain", r)

    # A retrained upstream stage (the text LM) makes pretrain stale although its flags are the same.
    run_stage(run, replace(fewer, llm_steps=5), "llm")
    status = stage_status(run, replace(fewer, llm_steps=5), "pretrain")
    assert not status.reuse and status.reason == "built from another llm than the one now in the run folder"


def test_a_stage_is_marked_unfinished_before_it_is_rebuilt(tmp_path, launches, monkeypatch):
    """If rebuilding fails halfway, the old result must not be reused under the new settings."""
    r = Recipe(**SMALL)
    run = tmp_path / "run"
    run_recipe(run, r, stages=["world", "tokenizer", "clip"])

    def crash(module, args, **kw):
        raise RuntimeError("killed")

    monkeypatch.setattr("minimind_v.launch.run_torchrun", crash)
    changed = replace(r, clip_steps=3)
    with pytest.raises(RuntimeError, match="killed"):
        run_stage(run, changed, "clip")
    assert not is_complete(stage_dir(run, "clip"))
    assert not is_done(run, "clip", r) and not is_done(run, "clip", changed)
    recorded = json.loads((stage_dir(run, "clip") / FINGERPRINT).read_text())
    assert recorded["fingerprint"] == stage_fingerprints(changed)["clip"]["fingerprint"]


def test_a_result_without_fingerprint_or_completion_is_not_reused(tmp_path):
    """The old rule (model.safetensors exists) is gone: a folder is finished only by complete.json."""
    r = Recipe(**SMALL)
    folder = stage_dir(tmp_path, "sft")
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"half")
    assert stage_status(tmp_path, r, "sft").reason == "no result yet"
    mark_complete(folder)
    status = stage_status(tmp_path, r, "sft")
    assert not status.reuse and "before fingerprints were kept" in status.reason


def test_the_recipe_command_takes_a_seed_and_finds_the_run_folder_from_anywhere(tmp_path, monkeypatch, launches):
    monkeypatch.setenv("MINIMIND_V_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MINIMIND_V_RUN", raising=False)
    monkeypatch.setenv("MINIMIND_V_QUICK", "1")
    monkeypatch.chdir(tmp_path)
    recipe_module.main(["--seed", "5", "--stages", "world"])
    world = json.loads((tmp_path / "home/runs/quick/world/world.json").read_text())
    assert world["config"]["seed"] == 5
    with pytest.raises(SystemExit):
        recipe_module.main(["--seed", "-1"])


def test_the_books_seed_and_world_settings_reach_the_recipe(tmp_path, monkeypatch, launches):
    from minimind_v.recipe import WORLD2, default_recipe

    monkeypatch.delenv("MINIMIND_V_QUICK", raising=False)
    monkeypatch.setenv("MINIMIND_V_SEED", "3")
    monkeypatch.setenv("MINIMIND_V_WORLD", "2")
    r = default_recipe()
    assert r.seed == 3 and r.question_types == WORLD2["question_types"]
    assert r.held_out_pairs == WORLD2["held_out_pairs"]
    assert world_config(r).held_out_pairs == (("red", "triangle"), ("blue", "cross"))
    assert r.sft_turns == WORLD2["sft_turns"] != Recipe.sft_turns
    # World 2's SFT meets a picture of k objects k times an epoch; world 1's takes every record once.
    _, sft_argv = recipe_module.stage_commands(tmp_path, r)["sft"]
    assert sft_argv[sft_argv.index("--object-repeats") + 1] == "1,2,3"
    _, sft_argv = recipe_module.stage_commands(tmp_path, recipe_module.with_world(r, 1))["sft"]
    assert "--object-repeats" not in sft_argv
    _, sft_argv = recipe_module.stage_commands(tmp_path, replace(r, sft_object_repeats=(1, 1, 1)))["sft"]
    assert "--object-repeats" not in sft_argv  # all ones: the same thing, said by leaving the flag out
    # A world that sets a size gets it, except in quick mode, which keeps its tiny sizes.
    monkeypatch.setitem(recipe_module.WORLDS, 2, {**WORLD2, "n_sft": 48000})
    assert default_recipe().n_sft == 48000
    monkeypatch.setenv("MINIMIND_V_QUICK", "1")
    quick = default_recipe()
    assert quick.n_sft == QUICK["n_sft"] and quick.question_types == WORLD2["question_types"]
    monkeypatch.delenv("MINIMIND_V_QUICK")
    monkeypatch.setitem(recipe_module.WORLDS, 2, WORLD2)
    for name, bad in (("MINIMIND_V_SEED", "-2"), ("MINIMIND_V_WORLD", "7")):
        monkeypatch.setenv(name, bad)
        with pytest.raises(ValueError, match=name):
            default_recipe()
        monkeypatch.delenv(name)
    # --world 1 on the command line wins over the environment's world 2
    monkeypatch.setenv("MINIMIND_V_QUICK", "1")
    monkeypatch.setenv("MINIMIND_V_WORLD", "2")
    monkeypatch.setenv("MINIMIND_V_HOME", str(tmp_path))
    recipe_module.main(["--world", "1", "--stages", "world"])
    world = json.loads((tmp_path / "runs/quick/world/world.json").read_text())
    assert world["config"]["held_out_pairs"] == [] and "existence" not in world["config"]["question_types"]
    assert world["config"]["n_sft"] == QUICK["n_sft"] and world["config"]["max_sft_turns"] == Recipe.sft_turns[1]


def test_a_stage_run_alone_trains_what_the_recipe_trains():
    """The training commands' defaults and the recipe's sizes come from one place (defaults.py)."""
    from minimind_v.train import clip, llm, vlm

    r = Recipe()
    for stage, steps in (("pretrain", r.pretrain_steps), ("sft", r.sft_steps)):
        ns = vlm.build_parser(stage).parse_args(["--data", "d", "--init", "i", "--out", "o"])
        assert (ns.steps, ns.batch_size, ns.freeze) == (steps, r.batch_size, getattr(r, f"{stage}_freeze"))
    ns = llm.build_parser().parse_args(["--data", "d", "--tokenizer", "t", "--out", "o"])
    assert (ns.steps, ns.batch_size) == (r.llm_steps, r.batch_size)
    assert (clip.TrainConfig().steps, clip.TrainConfig().batch_size) == (r.clip_steps, r.clip_batch)


def test_world_settings_reach_the_world_and_a_default_leaves_old_fingerprints_alone():
    r = replace(Recipe(**SMALL), caption_order="reading", sft_turns=(1, 2))
    config = world_config(r)
    assert (config.caption_order, config.min_sft_turns, config.max_sft_turns) == ("reading", 1, 2)
    # caption_order came after run folders existed: at its default it is not in the settings, so
    # those folders' worlds (and every stage built on them) are still reused.
    assert "caption_order" not in stage_fingerprints(Recipe(**SMALL))["world"]["settings"]["config"]
    assert stage_fingerprints(r)["world"]["settings"]["config"]["caption_order"] == "reading"
    # So with relation_answers, and the records of the recipe as well.
    worked = replace(Recipe(**SMALL), relation_answers="worked")
    assert world_config(worked).relation_answers == "worked"
    assert "relation_answers" not in stage_fingerprints(Recipe(**SMALL))["world"]["settings"]["config"]
    assert stage_fingerprints(worked)["world"]["settings"]["config"]["relation_answers"] == "worked"
    assert changed_stages(Recipe(**SMALL), worked) == set(recipe_module.STAGE_DIRS)  # the tokenizer reads the answers
    assert "relation_answers" not in recipe_module.recipe_record(Recipe(**SMALL))
    assert recipe_module.recipe_record(worked)["relation_answers"] == "worked"


def test_sfts_own_batch_reaches_sft_alone_and_its_default_leaves_old_fingerprints_and_records_alone():
    base = Recipe(**SMALL)
    smaller = replace(base, sft_batch_size=8)
    assert changed_stages(base, smaller) == {"sft", "eval"}
    commands = recipe_module.stage_commands(Path("run"), smaller)
    flag = lambda argv: argv[argv.index("--batch-size") + 1]  # noqa: E731
    assert flag(commands["sft"][1]) == "8"
    assert flag(commands["pretrain"][1]) == flag(commands["llm"][1]) == str(base.batch_size)
    # None, or SFT's batch equal to the common one: the SFT flags of before, so old runs are reused.
    assert changed_stages(base, replace(base, sft_batch_size=base.batch_size)) == set()
    # Records written before the field existed still match the recipe while it holds its default.
    assert "sft_batch_size" not in recipe_module.recipe_record(base)
    assert recipe_module.recipe_record(smaller)["sft_batch_size"] == 8
    assert recipe_module.recipe_record(base)["held_out_pairs"] == []  # as JSON holds it


def test_world_1_after_world_2_is_the_default_recipe_again(monkeypatch):
    monkeypatch.delenv("MINIMIND_V_QUICK", raising=False)
    monkeypatch.delenv("MINIMIND_V_WORLD", raising=False)
    base = recipe_module.default_recipe()
    two = recipe_module.with_world(base, 2)
    assert (two.sft_batch_size, two.sft_steps) != (base.sft_batch_size, base.sft_steps)  # world 2 sets its own
    assert recipe_module.with_world(two, 1) == base
