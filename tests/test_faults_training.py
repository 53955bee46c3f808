"""Training under faults: damaged or hostile checkpoints, resumes with other settings, folders of
earlier runs, torn metrics, bad flags, a failing step, kill -9 at chosen points, a rank that stops
answering. Each must end in a clear error or in the weights an uninterrupted run gives, exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, subprocess_env
from minimind_v.config import MiniMindConfig
from minimind_v.data.datasets import ChatDataset, DataError, Skipped, collate
from minimind_v.model.llm import MiniMindForCausalLM
from minimind_v.runfiles import COMPLETE, is_complete, read_complete
from minimind_v.train import checkpoint, trainer
from minimind_v.train.checkpoint import (CHECKPOINT, METRICS, CheckpointError, MetricsError, ResumeMismatchError,
                                         RunFolderError, read_checkpoint)
from minimind_v.train.common import lm_step_loss
from minimind_v.train.distributed import DistInfo
from minimind_v.train.trainer import TrainArgs, fit

ALONE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True, backend=None)


@pytest.fixture
def cpu_only(monkeypatch):
    """Runs here and in child processes on the CPU (gloo; bit-exact comparisons need no GPU kernels)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(scope="module")
def texts(tiny_world, world_tokenizer):
    """The tiny world's SFT conversations as text (40 samples): the cheapest thing to train on."""
    return ChatDataset(tiny_world / "sft_data.json", world_tokenizer, text_only=True, max_length=96)


def tiny_lm(tokenizer, seed=0, dim=32):
    torch.manual_seed(seed)
    return MiniMindForCausalLM(MiniMindConfig(vocab_size=len(tokenizer), dim=dim, n_layers=2, n_heads=4,
                                              n_kv_heads=2, max_position_embeddings=128))


def train(model, dataset, out, settings=None, **overrides):
    """fit() a few steps; returns (summary, the weights save_final was given or None)."""
    args = TrainArgs(out_dir=str(out), **{**dict(steps=4, batch_size=4, lr=1e-2, warmup_steps=1, log_every=1),
                                          **overrides})
    saved = {}

    def save_final(m, folder):
        saved["state"] = {k: v.detach().clone() for k, v in m.state_dict().items()}

    summary = fit(model, dataset, collate, args, ALONE, lm_step_loss, save_final, settings)
    return summary, saved.get("state")


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ: {different[:5]}"


def step_records(folder) -> list[dict]:
    return [r for r in map(json.loads, (Path(folder) / METRICS).read_text().splitlines()) if "step" in r]


# ----------------------------------------------------------------------------- the checkpoint reader


class RunsCode:
    """Unpickling this calls open(marker, "w"): a stand-in for any code a hostile pickle runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_damaged_checkpoints_fail_by_name(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"format": checkpoint.CHECKPOINT_FORMAT, "step": 3, "model": {"w": torch.ones(2)}, "optimizer": {},
                "settings": {"lr": 0.1, "data": "/x", "use_moe": False, "shape": (1, 2)}}, good)
    assert read_checkpoint(good)["step"] == 3
    data = good.read_bytes()
    cases = {"empty.pt": b"", "truncated.pt": data[: len(data) // 2], "garbage.pt": b"hello, not a checkpoint",
             "short.pt": data[:10]}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError) as caught:
            read_checkpoint(tmp_path / name)
        message = str(caught.value)
        assert str(tmp_path / name) in message and "--overwrite" in message, message
        assert ("empty" if name == "empty.pt" else "cannot be read") in message, message
    # Readable, but not what a training checkpoint holds.
    torch.save({"model": {}, "step": 1}, tmp_path / "old.pt")  # e.g. a trainer before settings were stored
    with pytest.raises(CheckpointError, match=r"old\.pt lacks \['format', 'optimizer', 'settings'\]"):
        read_checkpoint(tmp_path / "old.pt")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match=r"list\.pt holds a list"):
        read_checkpoint(tmp_path / "list.pt")
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        read_checkpoint(tmp_path / "nowhere.pt")


def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path, texts, world_tokenizer):
    # The control: loaded the old way (weights_only=False) this file really runs code.
    control = tmp_path / "control"
    torch.save({"model": RunsCode(control)}, tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert control.exists()

    marker = tmp_path / "ran"
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"format": checkpoint.CHECKPOINT_FORMAT, "step": 1, "model": RunsCode(marker), "optimizer": {},
                "settings": {}}, out / CHECKPOINT)
    with pytest.raises(CheckpointError) as caught:
        read_checkpoint(out / CHECKPOINT)
    message = str(caught.value)
    assert str(out / CHECKPOINT) in message and "refused" in message and "could run code" in message
    assert "not a plain-tensor checkpoint" in message
    # --resume goes through the same reader.
    with pytest.raises(CheckpointError, match="refused"):
        train(tiny_lm(world_tokenizer), texts, out, resume=True)
    assert not marker.exists()


# ----------------------------------------------------------------------------- resume: the same run or a clear no


def test_resume_refuses_other_settings_naming_each_flag(tmp_path, texts, world_tokenizer, capsys):
    settings = {"preset": "tiny", "data": "/data/a"}
    out = tmp_path / "run"
    train(tiny_lm(world_tokenizer), texts, out, settings, steps=4, stop_at=2)
    assert read_checkpoint(out / CHECKPOINT)["step"] == 2 and not is_complete(out)
    before = (out / CHECKPOINT).read_bytes()

    with pytest.raises(ResumeMismatchError) as caught:
        train(tiny_lm(world_tokenizer), texts, out, {**settings, "preset": "small"}, steps=4, batch_size=8,
              seed=1, resume=True)
    message = str(caught.value)
    assert str(out / CHECKPOINT) in message
    assert "--batch-size: saved 4, now 8" in message and "--seed: saved 0, now 1" in message
    assert "--preset: saved 'tiny', now 'small'" in message and "--allow-inexact-resume" in message
    assert "--grad-accum" not in message and "--data" not in message  # only what differs
    with pytest.raises(ResumeMismatchError, match="--grad-accum: saved 1, now 2"):
        train(tiny_lm(world_tokenizer), texts, out, settings, steps=4, grad_accum=2, resume=True)
    # A checkpoint beyond --steps is never relabelled, not even with --allow-inexact-resume.
    with pytest.raises(ResumeMismatchError, match=r"at step 2, beyond --steps 1.*--steps 4"):
        train(tiny_lm(world_tokenizer), texts, out, settings, steps=1, resume=True, allow_inexact_resume=True)
    # Weights of another model: the file and the keys that do not fit are named.
    with pytest.raises(CheckpointError) as caught:
        train(tiny_lm(world_tokenizer, dim=64), texts, out, settings, steps=4, resume=True)
    assert str(out / CHECKPOINT) in str(caught.value) and "tok_embeddings.weight saved (400, 32), model (400, 64)" \
        in str(caught.value)
    assert (out / CHECKPOINT).read_bytes() == before  # every refusal left the run as it was

    # With --allow-inexact-resume it continues, says so, and the record keeps the change.
    summary, final = train(tiny_lm(world_tokenizer), texts, out, settings, steps=4, seed=1, resume=True,
                           allow_inexact_resume=True)
    assert summary["finished"] and final is not None
    assert "no longer exact" in capsys.readouterr().err
    record = read_complete(out)
    assert record["inexact_resumes"] == [{"step": 2, "changed": {"seed": [0, 1]}}]
    assert record["settings"]["seed"] == 1 and record["summary"]["steps"] == 4


def test_a_folder_with_an_earlier_run_needs_resume_or_overwrite(tmp_path, texts, world_tokenizer):
    out = tmp_path / "run"
    _, first = train(tiny_lm(world_tokenizer), texts, out, steps=2)
    assert is_complete(out)
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(RunFolderError) as caught:
        train(tiny_lm(world_tokenizer), texts, out, steps=2)
    message = str(caught.value)
    assert f"{out} already holds {CHECKPOINT}, {METRICS}, {COMPLETE}" in message
    assert "pass --resume to continue or --overwrite to start again" in message
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files  # nothing touched

    # --overwrite starts afresh: an interrupted restart leaves no trace of the earlier run.
    summary, _ = train(tiny_lm(world_tokenizer, seed=5), texts, out, steps=2, stop_at=1, overwrite=True)
    assert not summary["finished"] and not is_complete(out)
    assert read_checkpoint(out / CHECKPOINT)["step"] == 1
    assert [r["step"] for r in step_records(out)] == [1]
    with pytest.raises(ValueError, match="--resume and --overwrite exclude each other"):
        train(tiny_lm(world_tokenizer), texts, out, resume=True, overwrite=True)


def test_a_torn_last_metrics_line_is_dropped_and_damage_before_it_is_an_error(tmp_path, texts, world_tokenizer):
    _, uninterrupted = train(tiny_lm(world_tokenizer), texts, tmp_path / "a", steps=4)
    out = tmp_path / "b"
    train(tiny_lm(world_tokenizer), texts, out, steps=4, stop_at=2)
    lines = (out / METRICS).read_text().splitlines()
    (out / METRICS).write_text("\n".join(lines) + '\n{"step": 3, "loss": 1.2')  # killed mid-write
    _, resumed = train(tiny_lm(world_tokenizer), texts, out, steps=4, resume=True)
    assert_same_weights(resumed, uninterrupted)
    assert [r["step"] for r in step_records(out)] == [1, 2, 3, 4]
    assert [r["loss"] for r in step_records(out)] == [r["loss"] for r in step_records(tmp_path / "a")]

    lines = (out / METRICS).read_text().splitlines()
    lines[2] = lines[2][:20]  # damage in the middle cannot be a torn append
    (out / METRICS).write_text("\n".join(lines) + "\n")
    with pytest.raises(MetricsError, match=rf"{re.escape(str(out / METRICS))} line 3 is not a JSON record"):
        train(tiny_lm(world_tokenizer), texts, out, steps=4, resume=True)


def test_a_moved_run_folder_resumes_but_other_data_is_refused(tiny_world, world_tokenizer_dir, tmp_path, alone,
                                                              capsys):
    from minimind_v.train import llm

    first = tmp_path / "first"
    shutil.copytree(tiny_world, first / "world")
    shutil.copytree(world_tokenizer_dir, first / "tokenizer")

    def stage(root, *extra):
        return llm.main(["--data", str(root / "world"), "--tokenizer", str(root / "tokenizer"), "--out",
                         str(root / "llm"), "--preset", "tiny", "--steps", "2", "--batch-size", "4",
                         "--max-length", "96", *extra])

    stage(first, "--stop-at", "1")
    moved = tmp_path / "moved"
    first.rename(moved)  # the whole run folder, inputs included: the same run
    assert stage(moved, "--resume")["finished"] and is_complete(moved / "llm")
    shutil.copytree(moved / "world", tmp_path / "other" / "world")
    shutil.copytree(moved / "tokenizer", tmp_path / "other" / "tokenizer")
    with pytest.raises(SystemExit):
        llm.main(["--data", str(tmp_path / "other" / "world"), "--tokenizer", str(moved / "tokenizer"), "--out",
                  str(moved / "llm"), "--preset", "tiny", "--steps", "2", "--batch-size", "4", "--max-length", "96",
                  "--resume"])
    assert "--data: saved '../world', now '../../other/world'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- flags


@pytest.mark.parametrize("field,value,expected", [
    ("steps", -3, "--steps must be >= 1, got -3"), ("grad_accum", 0, "--grad-accum must be >= 1, got 0"),
    ("batch_size", 0, "--batch-size must be >= 1"), ("log_every", 0, "--log-every must be >= 1"),
    ("save_every", -1, "--save-every must be >= 0"), ("lr", 0.0, "--lr must be > 0"),
    ("lr", float("nan"), "--lr must be a finite number"), ("min_lr_ratio", 1.5, "--min-lr-ratio must be <= 1"),
    ("warmup_steps", -1, "--warmup-steps must be >= 0"), ("weight_decay", -0.1, "--weight-decay must be >= 0"),
    ("grad_clip", -1.0, "--grad-clip must be >= 0"), ("steps", 2.5, "--steps must be a whole number"),
    ("stop_at", 0, "--stop-at must be >= 1"),
])
def test_train_args_refuse_values_out_of_range(field, value, expected):
    with pytest.raises(ValueError, match=re.escape(expected)):
        TrainArgs(out_dir="unused", **{field: value})
    TrainArgs(out_dir="unused")  # the defaults are fine


def test_cli_flags_out_of_range_are_argparse_errors_naming_the_flag(tmp_path, capsys, alone):
    from minimind_v.train import clip, llm, vlm

    earlier = tmp_path / "earlier"  # a folder with an earlier run's metrics (the data need not even exist)
    earlier.mkdir()
    (earlier / METRICS).write_text('{"step": 1, "loss": 2.0}\n')
    cases = [
        (llm.main, ["--data", "d", "--tokenizer", "t", "--out", str(tmp_path), "--grad-accum", "0"],
         "argument --grad-accum: must be >= 1, got 0"),
        (llm.main, ["--data", "d", "--tokenizer", "t", "--out", str(tmp_path), "--steps", "-3"],
         "argument --steps: must be >= 1, got -3"),
        (llm.main, ["--data", "d", "--tokenizer", "t", "--out", str(tmp_path), "--max-length", "1"],
         "argument --max-length: must be >= 2, got 1"),
        (lambda a: vlm.run_stage("sft", a), ["--data", "d", "--init", "i", "--out", str(tmp_path),
                                             "--mix-captions", "1.5"], "argument --mix-captions: must be <= 1"),
        (lambda a: vlm.run_stage("sft", a), ["--data", "d", "--init", "i", "--out", str(tmp_path), "--log-every",
                                             "0"], "argument --log-every: must be >= 1, got 0"),
        (lambda a: vlm.run_stage("sft", a), ["--data", "d", "--init", "i", "--out", str(tmp_path), "--resume",
                                             "--overwrite"], "--resume and --overwrite exclude each other"),
        (llm.main, ["--data", "missing", "--tokenizer", "missing", "--out", str(earlier)],
         f"{earlier} already holds {METRICS} from an earlier run: pass --resume to continue or --overwrite"),
        (clip.main, ["--out", str(tmp_path), "--save-every", "-2"], "argument --save-every: must be >= 0"),
        (clip.main, ["--out", str(tmp_path), "--lr", "0"], "argument --lr: must be > 0"),
    ]
    for main, argv, expected in cases:
        with pytest.raises(SystemExit) as caught:
            main(argv)
        assert caught.value.code == 2
        assert expected in capsys.readouterr().err, (argv, expected)


# ----------------------------------------------------------------------------- a step that fails


class BreaksOn(torch.utils.data.Dataset):
    """The dataset, with one sample that raises DataError while ``broken`` (a picture gone bad)."""

    def __init__(self, dataset, index):
        self.dataset, self.index, self.broken = dataset, index, True

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        if self.broken and i == self.index:
            raise DataError(f"record {i}: image 'x.png' cannot be read")
        return self.dataset[i]


def test_a_failing_step_saves_the_last_completed_step_for_resume(tmp_path, texts, world_tokenizer):
    _, uninterrupted = train(tiny_lm(world_tokenizer), texts, tmp_path / "a", steps=5)
    # A sample that step 4 draws (the data order is a seeded permutation: take it from the sampler).
    order = list(trainer.StepBatches(len(texts), 4, 0, 1, seed=0, start_micro_step=3, n_micro_steps=1))
    data = BreaksOn(texts, order[0][1])
    out = tmp_path / "b"
    with pytest.raises(DataError) as caught:
        train(tiny_lm(world_tokenizer), data, out, steps=5)  # --save-every 0: no checkpoint before the end
    note = " ".join(getattr(caught.value, "__notes__", []))
    assert "training stopped in step 4" in note and "the last completed step, 3, is saved" in note
    assert "--resume continues from it" in note
    assert read_checkpoint(out / CHECKPOINT)["step"] == 3 and not is_complete(out)
    data.broken = False  # the data is fixed
    _, resumed = train(tiny_lm(world_tokenizer, seed=3), data, out, steps=5, resume=True)
    assert_same_weights(resumed, uninterrupted)
    assert is_complete(out)

    # A failure in the first step of a run has nothing new to save, and says so.
    first = list(trainer.StepBatches(len(texts), 4, 0, 1, seed=0, start_micro_step=0, n_micro_steps=1))[0][0]
    with pytest.raises(DataError) as caught:
        train(tiny_lm(world_tokenizer), BreaksOn(texts, first), tmp_path / "c", steps=5)
    assert "before any step of this run completed" in " ".join(caught.value.__notes__)
    assert not (tmp_path / "c" / CHECKPOINT).exists()


class DropsPictures(torch.utils.data.Dataset):
    """The dataset, with the samples in ``bad`` marked as dropped (their picture failed when drawn,
    as under --skip-bad-samples): collate leaves them out."""

    def __init__(self, dataset, bad):
        self.dataset, self.bad = dataset, set(bad)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        sample = self.dataset[i]
        if i in self.bad:
            sample = dataclasses.replace(sample, problem=Skipped(str(i), "unreadable image", f"{i}: bad picture"))
        return sample


def test_batches_that_lose_samples_train_on_the_rest(tmp_path, texts, world_tokenizer):
    order = list(trainer.StepBatches(len(texts), 4, 0, 1, seed=0, start_micro_step=0, n_micro_steps=6))
    # Step 2's second micro-batch loses every sample; step 3's first loses one.
    data = DropsPictures(texts, order[3] + order[4][:1])
    model = tiny_lm(world_tokenizer)
    summary, final = train(model, data, tmp_path / "run", steps=3, grad_accum=2)
    assert all(torch.isfinite(t).all() for t in final.values())
    assert [r.get("dropped", 0) for r in step_records(tmp_path / "run")] == [0, 4, 1]
    assert summary["dropped_samples"] == 5
    # Step 2's loss is its first micro-batch's alone (the empty one neither adds nor dilutes).
    train(tiny_lm(world_tokenizer), data, tmp_path / "first", steps=3, grad_accum=2, stop_at=1)
    after_one = tiny_lm(world_tokenizer)
    after_one.load_state_dict(read_checkpoint(tmp_path / "first" / CHECKPOINT)["model"])
    after_one.train()
    with torch.no_grad():
        mean, _, _ = lm_step_loss(after_one, collate([texts[i] for i in order[2]]))
    assert step_records(tmp_path / "run")[1]["loss"] == pytest.approx(float(mean), abs=1e-5)


# ----------------------------------------------------------------------------- kill -9, then --resume

KILL_MID_CHECKPOINT = textwrap.dedent("""
    # Die (SIGKILL) half way through writing the checkpoint of step 4: its temporary file is there.
    import io, os, signal, sys, torch
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 4 and hasattr(f, "write"):
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            f.flush()
            os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save
    from minimind_v.train import llm
    llm.main(sys.argv[1:])
""")


def test_kill_9_anywhere_then_resume_gives_the_uninterrupted_weights(tiny_world, world_tokenizer_dir, tmp_path,
                                                                      alone, cpu_only):
    from minimind_v.train import llm

    common = ["--data", str(tiny_world), "--tokenizer", str(world_tokenizer_dir), "--preset", "tiny", "--steps", "6",
              "--batch-size", "4", "--warmup-steps", "1", "--log-every", "1", "--save-every", "2", "--max-length", "96"]
    llm.main([*common, "--out", str(tmp_path / "uninterrupted")])
    out = tmp_path / "run"

    def killed(*extra, kill_at=None, code=None):
        env = subprocess_env()
        if kill_at:
            env[checkpoint.KILL_AT_ENV] = kill_at
        command = [sys.executable, "-c", code] if code else [sys.executable, "-m", "minimind_v.train.llm"]
        run = subprocess.run([*command, *common, "--out", str(out), *extra], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=240)
        assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]
        assert not (out / COMPLETE).exists()  # never in a half-written folder
        return run

    killed(kill_at="step-3")  # mid-step: after step 3's backward, before its update
    assert read_checkpoint(out / CHECKPOINT)["step"] == 2 and not (out / "model.safetensors").exists()

    killed("--resume", code=KILL_MID_CHECKPOINT)  # mid-write of step 4's checkpoint
    assert list(out.glob(f"{CHECKPOINT}.*.tmp")), "the half-written temporary file should be there"
    assert read_checkpoint(out / CHECKPOINT)["step"] == 2  # the previous checkpoint, whole

    killed("--resume", kill_at="final-save")  # model.safetensors written, the tokenizer not yet
    assert (out / "model.safetensors").exists() and not (out / "tokenizer.json").exists()
    assert read_checkpoint(out / CHECKPOINT)["step"] == 6
    assert not list(out.glob("*.tmp"))  # the killed write's leftover was cleared

    llm.main([*common, "--out", str(out), "--resume"])
    assert_same_weights(load_file(out / "model.safetensors"),
                        load_file(tmp_path / "uninterrupted" / "model.safetensors"))
    assert is_complete(out) and (out / "tokenizer.json").exists()
    assert [r["step"] for r in step_records(out)] == list(range(1, 7))
    assert [r["loss"] for r in step_records(out)] == [r["loss"] for r in step_records(tmp_path / "uninterrupted")]


# ----------------------------------------------------------------------------- the tiny CLIP resumes the same way


def test_clip_resume_is_bit_identical_and_refuses_like_the_other_stages(tmp_path, alone, cpu_only, capsys):
    from minimind_v.train import clip as C

    tiny = ["--vision-width", "32", "--vision-layers", "1", "--vision-heads", "2", "--text-width", "32",
            "--text-layers", "1", "--text-heads", "2", "--projection-dim", "16", "--steps", "4", "--batch-size", "4",
            "--negatives", "1", "--eval-every", "2", "--eval-pairs", "64", "--probe-train", "0", "--log-every", "1",
            "--warmup-steps", "1", "--no-progress"]
    C.main([*tiny, "--out", str(tmp_path / "a")])
    out = tmp_path / "b"
    summary = C.main([*tiny, "--out", str(out), "--stop-at", "3", "--save-every", "2"])
    assert summary["finished"] is False and read_checkpoint(out / CHECKPOINT)["step"] == 3
    assert not is_complete(out) and not (out / "model.safetensors").exists()

    for extra, expected in ([[], "pass --resume to continue or --overwrite to start again"],
                            [["--resume", "--seed", "1"], "--seed: saved 0, now 1"],
                            [["--resume", "--negatives", "2"], "--negatives: saved 1, now 2"]):
        with pytest.raises(SystemExit):
            C.main([*tiny, "--out", str(out), *extra])
        assert expected in capsys.readouterr().err

    C.main([*tiny, "--out", str(out), "--resume"])
    assert is_complete(out) and read_complete(out)["summary"]["steps"] == 4
    assert_same_weights(load_file(out / "model.safetensors"), load_file(tmp_path / "a" / "model.safetensors"))
    heads = [read_checkpoint(folder / CHECKPOINT)["model"] for folder in (out, tmp_path / "a")]
    assert_same_weights(*heads)  # the training-only heads too
    def curve(folder):  # the losses and evaluations, without the timings
        return [{k: v for k, v in r.items() if k not in ("elapsed_s", "images_per_s")}
                for r in map(json.loads, (folder / METRICS).read_text().splitlines())
                if "loss" in r or "retrieval_top1" in r]

    assert curve(out) == curve(tmp_path / "a")  # each step (and the step-2 evaluation) once, same values


# ----------------------------------------------------------------------------- a rank that stops answering

DDP_FREEZE_SCRIPT = textwrap.dedent("""
    import os, sys, time
    from minimind_v.train import distributed as D
    from minimind_v.train import llm

    info = D.setup_distributed()
    print(f"rank {info.rank} pid {os.getpid()}", flush=True)
    # Work on rank 0 alone for twice the collective timeout: the others must wait it out, not time out.
    if os.environ.get("LONG_TASK"):
        D.run_on_main(lambda: time.sleep(2 * D.collective_timeout_s()), "a long task")
        print(f"rank {info.rank} is past the long task", flush=True)
    llm.main(sys.argv[1:])
""")


@pytest.mark.slow
@pytest.mark.parametrize("frozen", [1, 0])
def test_a_rank_that_stops_answering_ends_the_job_naming_it(tiny_world, world_tokenizer_dir, tmp_path, frozen,
                                                            cpu_only):
    """A rank freezes (SIGSTOP) in step 3; the other one's collective times out, it saves the last
    completed step (rank 0, or rank 1 when rank 0 is the one gone) and fails naming the frozen rank."""
    timeout_s, live = 3, 1 - frozen
    script = tmp_path / "freeze.py"
    script.write_text(DDP_FREEZE_SCRIPT)
    env = {**subprocess_env(), "MINIMIND_V_DDP_TIMEOUT_S": str(timeout_s), checkpoint.KILL_AT_ENV: f"step-3@{frozen}",
           checkpoint.KILL_SIGNAL_ENV: "SIGSTOP", "LONG_TASK": "1" if frozen == 1 else ""}
    out = tmp_path / "run"
    job = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         "--data", str(tiny_world), "--tokenizer", str(world_tokenizer_dir), "--preset", "tiny", "--steps", "40",
         "--batch-size", "2", "--warmup-steps", "1", "--log-every", "1", "--max-length", "96", "--out", str(out)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, events = [], {}

    def read():
        for line in job.stdout:
            lines.append(line)
            now = time.monotonic()
            if "sends itself SIGSTOP" in line:
                events.setdefault("stopped", now)
            if "stopped answering" in line:
                events.setdefault("named", now)
            if "closing signal SIGTERM" in line:  # torchrun saw the live rank fail and stops the other
                events.setdefault("closing", now)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while "closing" not in events and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        output = "".join(lines)
        pids = {int(r): int(p) for r, p in re.findall(r"rank (\d) pid (\d+)", output)}
        assert frozen == 0 or "rank 1 is past the long task" in output, output[-3000:]
        assert "named" in events and "closing" in events, output[-4000:]
        assert re.search(rf"rank {frozen} stopped answering (in|after) step \d+\b.*: rank {live}'s collective got "
                         rf"no reply within 3 s \(MINIMIND_V_DDP_TIMEOUT_S\)", output), output[-3000:]
        # The bound: the timeout, then at most min(T, 30) s for the other ranks to check in; then the
        # live rank exits and torchrun starts stopping the job.
        assert events["closing"] - events["stopped"] < 2 * timeout_s + 20, output[-3000:]
        # torchrun SIGKILLs a rank that ignores SIGTERM (a stopped one) only after 30 s: do it for it.
        os.kill(pids[frozen], signal.SIGKILL)
        assert job.wait(timeout=60) != 0
        reader.join(timeout=10)
        output = "".join(lines)
        root_cause = output[output.index("Root Cause"):]
        assert re.search(rf"rank\s*:\s*{live} .*\n.*exitcode\s*:\s*1 \(pid: {pids[live]}\)", root_cause), root_cause
        # The live rank saved the last step it completed before it gave up.
        assert read_checkpoint(out / CHECKPOINT)["step"] == 3 and not is_complete(out)
    finally:
        pids = {int(r): int(p) for r, p in re.findall(r"rank (\d) pid (\d+)", "".join(lines))}
        for pid in pids.values():
            try:
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if job.poll() is None:
            job.kill()
            job.wait(timeout=30)
