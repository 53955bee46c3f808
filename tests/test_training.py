"""The training loop and the stage entry points: the right loss, the right parameters, the same
result however the work is split (processes, accumulation, interruptions), and folders that load.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

from conftest import REPO, TINY_CLIP_TOKENS, subprocess_env
from minimind_v.config import MiniMindConfig
from minimind_v.data.datasets import ChatDataset, DataError, collate, read_records
from minimind_v.data.records import find_image
from minimind_v.model.llm import MiniMindForCausalLM
from minimind_v.train import checkpoint as ckpt
from minimind_v.train.checkpoint import CHECKPOINT, METRICS
from minimind_v.train.common import lm_step_loss, set_trainable
from minimind_v.train.distributed import DistInfo
from minimind_v.train.trainer import StepBatches, TrainArgs, fit, lr_at

ALONE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True, backend=None)


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(folder) / METRICS).read_text().splitlines()]


def step_losses(folder: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(folder) if "step" in r}


# ----------------------------------------------------------------------------- schedule and freezing


def test_lr_warms_up_linearly_then_follows_a_cosine_to_the_floor():
    args = TrainArgs(out_dir="unused", steps=12, lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    # warm-up: (step + 1) / 4 of the peak
    assert [lr_at(s, args) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    # cosine over the 8 steps after warm-up: 0.1 + 0.9 * (1 + cos(pi * k / 8)) / 2
    assert lr_at(4, args) == pytest.approx(1.0)
    assert lr_at(6, args) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))  # 0.86820
    assert lr_at(8, args) == pytest.approx(0.55)  # half way: the mean of peak and floor
    assert lr_at(11, args) == pytest.approx(0.1 + 0.45 * (1 + math.cos(7 * math.pi / 8)))  # 0.13425
    assert lr_at(12, args) == pytest.approx(0.1)  # the cosine ends at lr * min_lr_ratio...
    assert lr_at(50, args) == pytest.approx(0.1)  # ...and stays there
    decay = [lr_at(s, args) for s in range(3, 13)]
    assert all(a > b for a, b in zip(decay[1:], decay[2:]))
    no_warmup = TrainArgs(out_dir="unused", steps=10, lr=2e-3, warmup_steps=0)
    assert lr_at(0, no_warmup) == pytest.approx(2e-3)


def test_freeze_strategies_train_the_parameters_counted_by_hand(make_tiny_vlm):
    model = make_tiny_vlm(n_layers=3)  # dim 32, 4 heads of 8, 2 KV heads, vocab 400, CLIP width 32
    assert (model.config.vocab_size, model.config.vision_width) == (400, 32)
    hidden = 128  # 64 * ceil((8 * 32 / 3) / 64)
    assert model.config.hidden_dim == hidden
    per_layer = (2 * 32                 # attention_norm, ffn_norm
                 + 32 * 32 + 32 * 32    # wq, wo
                 + 2 * 32 * 16          # wk, wv: 2 KV heads x 8
                 + 3 * 32 * hidden)     # w1, w2, w3
    projection = 32 * 32 + 32           # Linear(32 -> 32) with bias
    embedding = 400 * 32                # tied with the output head: counted once
    total = embedding + 3 * per_layer + 32 + projection
    assert (per_layer, total) == (15424, 60160)
    assert set_trainable(model, "proj") == (projection, total)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "vision_proj.layers.0.weight", "vision_proj.layers.0.bias"}
    assert set_trainable(model, "ends") == (projection + 2 * per_layer, total)
    trained_layers = {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad and n.startswith("layers.")}
    assert trained_layers == {"0", "2"}
    assert not model.tok_embeddings.weight.requires_grad and not model.norm.weight.requires_grad
    assert set_trainable(model, "all") == (total, total)

    one_layer = make_tiny_vlm(n_layers=1, projector="mlp")
    mlp = 2 * (32 * 32 + 32)
    assert set_trainable(one_layer, "ends") == (mlp + per_layer, embedding + per_layer + 32 + mlp)
    with pytest.raises(ValueError, match="unknown freeze strategy 'some'"):
        set_trainable(model, "some")


def test_step_batches_split_one_global_batch_and_resume_where_they_stopped():
    n, B = 23, 3
    one = list(StepBatches(n, 2 * B, rank=0, world_size=1, seed=5, start_micro_step=0, n_micro_steps=9))
    ranks = [list(StepBatches(n, B, rank=r, world_size=2, seed=5, start_micro_step=0, n_micro_steps=9))
             for r in range(2)]
    assert [a + b for a, b in zip(*ranks)] == one  # rank 0's rows, then rank 1's: the same global batch
    # 23 // 6 = 3 global batches per epoch; within an epoch no sample repeats
    for epoch in range(3):
        seen = sum(one[3 * epoch : 3 * epoch + 3], [])
        assert len(set(seen)) == len(seen) == 18 and set(seen) <= set(range(n))
    assert sum(one[0:3], []) != sum(one[3:6], [])  # each epoch reshuffles
    resumed = list(StepBatches(n, 2 * B, 0, 1, seed=5, start_micro_step=4, n_micro_steps=5))
    assert resumed == one[4:]
    with pytest.raises(ValueError, match="smaller than one global batch"):
        StepBatches(5, 3, 0, 2, 0, 0, 1)


def test_step_batches_curriculum_orders_the_first_epoch_by_level_and_leaves_the_rest_random():
    n, B = 24, 4
    levels = [i % 3 + 1 for i in range(n)]  # 1, 2, 3, 1, 2, 3, ...
    plain = list(StepBatches(n, B, 0, 1, seed=7, start_micro_step=0, n_micro_steps=12))
    ordered = list(StepBatches(n, B, 0, 1, seed=7, start_micro_step=0, n_micro_steps=12,
                               first_epoch_levels=levels))
    first, plain_first = sum(ordered[:6], []), sum(plain[:6], [])
    assert sorted(first) == list(range(n))  # an epoch still takes every sample once
    assert [levels[i] for i in first] == sorted(levels)  # fewest objects first
    # Within a level, the order is the random one the plain epoch would have had.
    for level in (1, 2, 3):
        assert [i for i in first if levels[i] == level] == [i for i in plain_first if levels[i] == level]
    assert ordered[6:] == plain[6:]  # the second epoch is random, as without a curriculum
    # Resuming inside the curriculum epoch gives the same batches; two ranks split each global batch.
    assert list(StepBatches(n, B, 0, 1, 7, 3, 9, first_epoch_levels=levels)) == ordered[3:]
    ranks = [list(StepBatches(n, B // 2, r, 2, 7, 0, 12, first_epoch_levels=levels)) for r in range(2)]
    assert [a + b for a, b in zip(*ranks)] == ordered
    with pytest.raises(ValueError, match=r"first_epoch_levels holds \(23,\) values for a dataset of 24 samples"):
        StepBatches(n, B, 0, 1, 7, 0, 1, first_epoch_levels=levels[:-1])


# ----------------------------------------------------------------------------- the loss of a step


@pytest.fixture(scope="module")
def sft_dataset(tiny_world, world_tokenizer, tiny_encoder):
    return ChatDataset(tiny_world / "sft_data.json", world_tokenizer, TINY_CLIP_TOKENS,
                       image_dir=tiny_world / "sft_images", preprocess=tiny_encoder.preprocess)


def fresh_vlm(make_tiny_vlm, tiny_encoder, seed=0):
    return make_tiny_vlm(seed=seed).attach_vision_encoder(tiny_encoder)


class Recorder:
    """Wraps the step loss (batch ids, per micro-batch) and catches the gradients of each
    optimizer step, before the update."""

    def __init__(self, model, fail_at_call: int | None = None):
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.ids, self.grads, self.fail_at_call = [], [], fail_at_call
        self.handle = register_optimizer_step_pre_hook(self.on_step)

    def on_step(self, optimizer, args, kwargs):
        self.grads.append({self.names[id(p)]: p.grad.detach().clone()
                           for g in optimizer.param_groups for p in g["params"] if p.grad is not None})

    def step_loss(self, model, batch):
        if self.fail_at_call is not None and len(self.ids) + 1 == self.fail_at_call:
            raise KeyboardInterrupt("killed")
        self.ids.append(list(batch.ids))
        return lm_step_loss(model, batch)

    def close(self):
        self.handle.remove()


def run_fit(model, dataset, out_dir, recorder=None, **train):
    args = TrainArgs(out_dir=str(out_dir), **{**dict(steps=3, batch_size=4, lr=1e-2, warmup_steps=1,
                                                      weight_decay=0.0, grad_clip=0.0, log_every=1), **train})
    saved = {}

    def save_final(m, folder):
        saved["state"] = {k: v.detach().clone() for k, v in m.state_dict().items()}

    summary = fit(model, dataset, collate, args, ALONE, recorder.step_loss if recorder else lm_step_loss, save_final)
    return summary, saved.get("state")


def test_step_loss_is_the_mean_over_every_answer_token_of_the_global_batch(make_tiny_vlm, tiny_encoder,
                                                                            sft_dataset, tmp_path):
    """Two accumulated micro-batches of 3 give the gradient of the mean token loss over all 6
    samples, computed here one sample at a time (a sample with more answer tokens weighs more)."""
    model = fresh_vlm(make_tiny_vlm, tiny_encoder)
    reference = copy.deepcopy(model).attach_vision_encoder(tiny_encoder)
    recorder = Recorder(model)
    try:
        run_fit(model, sft_dataset, tmp_path / "run", recorder, steps=1, batch_size=3, grad_accum=2)
    finally:
        recorder.close()
    assert len(recorder.ids) == 2 and len(recorder.grads) == 1
    index = {item[0]: i for i, item in enumerate(sft_dataset.items)}
    samples = [sft_dataset[index[rid]] for rid in sum(recorder.ids, [])]

    reference.train()
    total_loss, total_targets = 0.0, 0
    for s in samples:  # per sample: no padding, no batching
        pixels = s.image if s.image.dim() == 4 else s.image[None]  # (n_images, 3, S, S) per sample
        out = reference(input_ids=s.input_ids[None], labels=s.labels[None], pixel_values=pixels,
                        use_cache=False)
        n = int((s.labels[1:] != -100).sum())
        total_loss = total_loss + out.loss * n
        total_targets += n
    assert len({int((s.labels[1:] != -100).sum()) for s in samples}) > 1  # unequal weights really tested
    mean = total_loss / total_targets
    mean.backward()
    assert step_losses(tmp_path / "run")[1] == pytest.approx(float(mean.detach()), abs=1e-5)
    expected = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert expected.keys() == recorder.grads[0].keys()
    for name, grad in expected.items():
        torch.testing.assert_close(recorder.grads[0][name], grad, rtol=1e-5, atol=1e-5 * float(grad.abs().max()),
                                   msg=name)


# ----------------------------------------------------------------------------- resume and checkpoints


def test_a_stopped_run_resumed_equals_an_uninterrupted_one(make_tiny_vlm, tiny_encoder, sft_dataset, tmp_path):
    _, uninterrupted = run_fit(fresh_vlm(make_tiny_vlm, tiny_encoder), sft_dataset, tmp_path / "a", steps=6)

    summary, final = run_fit(fresh_vlm(make_tiny_vlm, tiny_encoder), sft_dataset, tmp_path / "b", steps=6, stop_at=3)
    assert summary["steps"] == 3 and not summary["finished"] and final is None  # no final model yet
    assert torch.load(tmp_path / "b" / CHECKPOINT, weights_only=False)["step"] == 3
    # Resume into a model with other weights: everything must come from the checkpoint.
    summary, resumed = run_fit(fresh_vlm(make_tiny_vlm, tiny_encoder, seed=7), sft_dataset, tmp_path / "b",
                               steps=6, resume=True)
    assert summary["finished"] and summary["steps"] == 6
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6, msg=name)
    assert step_losses(tmp_path / "b") == step_losses(tmp_path / "a")
    assert not list(tmp_path.glob("*/*.tmp"))


def test_a_killed_run_resumes_from_its_last_checkpoint(make_tiny_vlm, tiny_encoder, sft_dataset, tmp_path):
    _, uninterrupted = run_fit(fresh_vlm(make_tiny_vlm, tiny_encoder), sft_dataset, tmp_path / "a", steps=5)

    model = fresh_vlm(make_tiny_vlm, tiny_encoder)
    killer = Recorder(model, fail_at_call=4)  # dies inside step 4, after the checkpoint of step 2
    try:
        with pytest.raises(KeyboardInterrupt):
            run_fit(model, sft_dataset, tmp_path / "b", killer, steps=5, save_every=2)
    finally:
        killer.close()
    assert torch.load(tmp_path / "b" / CHECKPOINT, weights_only=False)["step"] == 2
    _, resumed = run_fit(fresh_vlm(make_tiny_vlm, tiny_encoder, seed=9), sft_dataset, tmp_path / "b",
                         steps=5, resume=True, save_every=2)
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_a_resumed_run_logs_each_step_once(make_tiny_vlm, tiny_encoder, sft_dataset, tmp_path):
    """Steps logged after the last checkpoint of a killed run are done again on resume; the
    metrics must then hold each step once (the loss curve is drawn from them)."""
    model = fresh_vlm(make_tiny_vlm, tiny_encoder)
    killer = Recorder(model, fail_at_call=4)  # step 3 is logged, then the run dies; checkpoint: step 2
    try:
        with pytest.raises(KeyboardInterrupt):
            run_fit(model, sft_dataset, tmp_path / "run", killer, steps=4, save_every=2)
    finally:
        killer.close()
    assert [r["step"] for r in metrics(tmp_path / "run") if "step" in r] == [1, 2, 3]
    run_fit(fresh_vlm(make_tiny_vlm, tiny_encoder), sft_dataset, tmp_path / "run", steps=4, save_every=2,
            resume=True)
    assert [r["step"] for r in metrics(tmp_path / "run") if "step" in r] == [1, 2, 3, 4]


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / CHECKPOINT
    ckpt.atomic_torch_save({"step": 1, "w": torch.arange(4.0)}, path)
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT]

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="No space left"):
        ckpt.atomic_torch_save({"step": 2, "w": torch.zeros(4)}, path)
    monkeypatch.undo()
    state = torch.load(path, weights_only=False)  # the previous checkpoint, whole
    assert state["step"] == 1 and torch.equal(state["w"], torch.arange(4.0))
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT], "a failed save must not leave its .tmp behind"


def test_a_file_replaced_atomically_is_whole_or_untouched(tmp_path):
    from minimind_v.runfiles import replaced_atomically

    path = tmp_path / "data.bin"
    path.write_bytes(b"old")
    with pytest.raises(ValueError, match="writer failed"):
        with replaced_atomically(path) as temporary:
            temporary.write_bytes(b"half of the new")
            raise ValueError("writer failed")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["data.bin"]
    with replaced_atomically(path) as temporary:
        assert temporary.parent == path.parent and temporary != path
        temporary.write_bytes(b"new")
        assert path.read_bytes() == b"old"  # nothing changes until the block ends
    assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["data.bin"]


# ----------------------------------------------------------------------------- the stage entry points


@pytest.fixture(scope="module")
def tiny_lm_dir(world_tokenizer, tmp_path_factory) -> Path:
    """A small random text LM with the world tokenizer, saved as the LM stage saves it."""
    torch.manual_seed(0)
    lm = MiniMindForCausalLM(MiniMindConfig(vocab_size=len(world_tokenizer), dim=32, n_layers=2, n_heads=4,
                                            n_kv_heads=2, max_position_embeddings=1024))
    folder = tmp_path_factory.mktemp("lm") / "lm"
    lm.save_pretrained(folder)
    world_tokenizer.save_pretrained(folder)
    return folder


def run_module(module: str, *args: str, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=subprocess_env(),
                         capture_output=True, text=True, timeout=timeout)
    if check:
        assert run.returncode == 0, f"{module} failed:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
    return run


SMALL_STEPS = ("--steps", "2", "--batch-size", "4", "--warmup-steps", "1", "--log-every", "1")


def test_sft_cli_skips_and_counts_bad_samples(tiny_world, tiny_lm_dir, tiny_clip_dir, tmp_path, alone):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copytree(tiny_world / "sft_images", data / "sft_images")
    records = read_records(tiny_world / "sft_data.json")
    broken_image = find_image(data / "sft_images", records[5]["image"])  # COCO_train2014_<image>, v1's SFT naming
    broken_image.write_bytes(broken_image.read_bytes()[:100])
    del records[9]["conversations"]
    (data / "sft_data.json").write_text(json.dumps(records), encoding="utf-8")

    run = run_module("minimind_v.train.sft_vlm", "--data", data, "--init", tiny_lm_dir, "--vision", tiny_clip_dir,
                     "--out", tmp_path / "sft", *SMALL_STEPS, "--skip-bad-samples")
    # Records are read lazily: a bad one is dropped when drawn, and the run counts it.
    assert f"sft: {len(records)} samples" in run.stdout
    assert (tmp_path / "sft" / "model.safetensors").exists()
    summary = json.loads((tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()[-1])["summary"]
    assert summary["finished"] and summary.get("dropped_samples", 0) >= 1

    # Without the flag the first broken record drawn stops the run, by name and by what is wrong
    # (checked in-process: same code).
    from minimind_v.train.vlm import run_stage

    named = rf"record '{records[5]['id']}'.*cannot decode|record '{records[9]['id']}'.*conversations"
    with pytest.raises(DataError, match=named):
        run_stage("sft", ["--data", str(data), "--init", str(tiny_lm_dir), "--vision", str(tiny_clip_dir),
                          "--out", str(tmp_path / "sft2"), *SMALL_STEPS])


def test_sft_object_repeats_takes_each_record_as_often_as_its_objects_say(tiny_world, tiny_lm_dir, tiny_clip_dir,
                                                                          tmp_path, alone):
    """`--object-repeats 1,3,2`: a record whose scene holds k objects is in the SFT set N_k times
    (counted here from the scene descriptions), and the setting goes into the run's settings."""
    from collections import Counter

    from minimind_v.train.vlm import prepare_stage

    records = read_records(tiny_world / "sft_data.json")
    repeats = {1: 1, 2: 3, 3: 2}
    objects = {r["id"]: len(r["scene"]) for r in records}
    assert set(objects.values()) == {1, 2, 3}  # the tiny world holds every count
    base = ["--data", str(tiny_world), "--init", str(tiny_lm_dir), "--vision", str(tiny_clip_dir), *SMALL_STEPS]
    built = prepare_stage("sft", [*base, "--out", str(tmp_path / "sft"), "--object-repeats", "1,3,2"])
    dataset = built["dataset"]
    taken = Counter(r["id"] for r in dataset.records)
    assert taken == {rid: repeats[k] for rid, k in objects.items()}
    assert len(dataset) == sum(repeats[k] for k in objects.values())
    assert built["settings"]["object_repeats"] == [1, 3, 2]
    plain = prepare_stage("sft", [*base, "--out", str(tmp_path / "plain")])
    assert len(plain["dataset"]) == len(records) and "object_repeats" not in plain["settings"]
    # A record with more objects than the repeats name is refused, by name.
    with pytest.raises(ValueError, match=r"sft_data.json\[\d+\] \(shapes_sft_\d+\): 3 objects, but the repeats 1,2 stop at 2"):
        prepare_stage("sft", [*base, "--out", str(tmp_path / "short"), "--object-repeats", "1,2"])


def test_sft_object_curriculum_gives_each_sample_its_pictures_objects(tiny_world, tiny_lm_dir, tiny_clip_dir,
                                                                      tmp_path, alone):
    """`--object-curriculum`: one level per sample, the number of objects in its picture (counted
    here from each sample's own record, the repeated SFT records and the mixed-in captions alike),
    handed to the sampler, and written into the run's settings."""
    from minimind_v.train.vlm import prepare_stage

    base = ["--data", str(tiny_world), "--init", str(tiny_lm_dir), "--vision", str(tiny_clip_dir), *SMALL_STEPS]
    built = prepare_stage("sft", [*base, "--out", str(tmp_path / "sft"), "--object-curriculum",
                                  "--object-repeats", "1,3,2", "--mix-captions", "0.5"])
    parts = built["dataset"].datasets
    samples = [r for part in parts for r in part.records]
    assert len(parts) == 2 and len(samples) == len(built["dataset"])
    assert built["first_epoch_levels"] == [len(r["scene"]) for r in samples]
    assert set(built["first_epoch_levels"]) == {1, 2, 3}
    assert built["settings"]["object_curriculum"] is True
    plain = prepare_stage("sft", [*base, "--out", str(tmp_path / "plain")])
    assert plain["first_epoch_levels"] is None and "object_curriculum" not in plain["settings"]


def test_sft_count_shared_trains_on_the_records_with_their_counts_asked_again(tiny_world, tiny_lm_dir,
                                                                             tiny_clip_dir, tmp_path, alone):
    """`--count-shared` (with the repeats): the SFT set holds data.shapes_records.count_shared of the
    world's records, seeded by the stage's --seed, and the setting goes into the run's settings."""
    from minimind_v.data.shapes_records import count_shared, repeat_by_objects
    from minimind_v.train.vlm import prepare_stage

    base = ["--data", str(tiny_world), "--init", str(tiny_lm_dir), "--vision", str(tiny_clip_dir), *SMALL_STEPS]
    built = prepare_stage("sft", [*base, "--out", str(tmp_path / "sft"), "--count-shared", "--seed", "4",
                                  "--object-repeats", "1,2,3"])
    records = read_records(tiny_world / "sft_data.json")
    assert built["dataset"].records == repeat_by_objects(count_shared(records, 4), (1, 2, 3))
    assert built["dataset"].records != repeat_by_objects(records, (1, 2, 3))  # some count was asked again
    assert built["settings"]["count_shared"] is True


def test_object_repeats_flag_is_checked():
    from minimind_v.train.vlm import build_parser

    parser = build_parser("sft")
    base = ["--data", "d", "--init", "i", "--out", "o"]
    assert parser.parse_args(base).object_repeats is None
    assert parser.parse_args(base + ["--object-repeats", "1,2,3"]).object_repeats == (1, 2, 3)
    for bad in ("1,0,2", "1,two", ""):
        with pytest.raises(SystemExit):
            parser.parse_args(base + ["--object-repeats", bad])


DDP_SCRIPT = textwrap.dedent("""
    # Run the SFT entry point, recording each micro-batch's (loss * targets, targets, ids) and the
    # gradients of the first optimizer step (after DDP's all-reduce, before the update).
    import os, sys, torch
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    from minimind_v.train import vlm as stage

    dump, argv = sys.argv[1], sys.argv[2:]
    rank = int(os.environ.get("RANK", "0"))
    grads, micro = [], []

    def on_step(optimizer, args, kwargs):
        if not grads:
            grads.append([p.grad.detach().clone() for g in optimizer.param_groups for p in g["params"]])

    register_optimizer_step_pre_hook(on_step)
    inner = stage.lm_step_loss

    def recording(model, batch):
        mean, extra, n = inner(model, batch)
        micro.append((float(mean.detach()) * n, n, list(batch.ids)))
        return mean, extra, n

    stage.lm_step_loss = recording
    stage.run_stage("sft", argv)
    torch.save({"grads": grads[0], "micro": micro}, f"{dump}/rank{rank}.pt")
""")


@pytest.mark.slow
def test_two_ddp_processes_equal_one_process_with_the_whole_batch(tiny_world, tiny_lm_dir, tiny_clip_dir, tmp_path):
    script = tmp_path / "record_sft.py"
    script.write_text(DDP_SCRIPT)
    common = ["--data", tiny_world, "--init", tiny_lm_dir, "--vision", tiny_clip_dir, "--steps", "2",
              "--lr", "1e-2", "--warmup-steps", "1", "--weight-decay", "0", "--grad-clip", "0", "--log-every", "1"]
    (tmp_path / "ddp").mkdir()
    (tmp_path / "one").mkdir()
    env = subprocess_env()
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          script, tmp_path / "ddp", *common, "--batch-size", "4", "--out", tmp_path / "ddp" / "out"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    one = subprocess.run([sys.executable, script, tmp_path / "one", *common, "--batch-size", "8",
                          "--out", tmp_path / "one" / "out"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=400)
    assert one.returncode == 0, one.stderr[-4000:]

    single = torch.load(tmp_path / "one" / "rank0.pt")
    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in range(2)]
    assert len(single["micro"]) == 2 and all(len(r["micro"]) == 2 for r in ranks)
    for step in range(2):
        # the two ranks together saw exactly the single process's batch
        assert ranks[0]["micro"][step][2] + ranks[1]["micro"][step][2] == single["micro"][step][2]
        assert len(ranks[0]["micro"][step][2]) == 4
    # first step loss: token-weighted over both ranks
    loss_sum = sum(r["micro"][0][0] for r in ranks)
    targets = sum(r["micro"][0][1] for r in ranks)
    assert targets == single["micro"][0][1]
    assert loss_sum / targets == pytest.approx(single["micro"][0][0] / single["micro"][0][1], rel=1e-5)
    assert step_losses(tmp_path / "ddp" / "out")[1] == pytest.approx(step_losses(tmp_path / "one" / "out")[1], abs=2e-5)
    # the same gradients on every rank, equal to the whole batch's
    assert len(single["grads"]) == len(ranks[0]["grads"]) > 10
    for g_one, g0, g1 in zip(single["grads"], ranks[0]["grads"], ranks[1]["grads"]):
        torch.testing.assert_close(g0, g1, rtol=0, atol=0)
        torch.testing.assert_close(g0, g_one, rtol=1e-5, atol=1e-5 * float(g_one.abs().max()))
    # The second step starts from the same weights, so its loss agrees too.
    second = sum(r["micro"][1][0] for r in ranks) / sum(r["micro"][1][1] for r in ranks)
    assert second == pytest.approx(single["micro"][1][0] / single["micro"][1][1], rel=1e-5)
    # And the weights after two steps. AdamW divides each gradient by its own size, so where a
    # gradient is ~1e-8 (its eps) float rounding of ~1e-7 relative moves that weight by a visible
    # part of a step; "equal" here is: every weight within 1% of one step (lr) of the other.
    a = load_file(tmp_path / "ddp" / "out" / "model.safetensors")
    b = load_file(tmp_path / "one" / "out" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-2 * 1e-2, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def stages(tiny_world, world_tokenizer_dir, tiny_clip_dir, tmp_path_factory):
    """LM -> caption pretraining -> SFT, a few steps each, through the real entry points."""
    from minimind_v.train import llm
    from minimind_v.train.vlm import run_stage

    root = tmp_path_factory.mktemp("stages")
    with pytest.MonkeyPatch.context() as mp:
        from conftest import TORCHRUN_VARS

        for name in TORCHRUN_VARS:
            mp.delenv(name, raising=False)
        threads = torch.get_num_threads()
        try:
            llm.main(["--data", str(tiny_world), "--tokenizer", str(world_tokenizer_dir), "--out", str(root / "lm"),
                      "--preset", "tiny", *SMALL_STEPS, "--steps", "3"])
            run_stage("pretrain", ["--data", str(tiny_world), "--init", str(root / "lm"),
                                   "--vision", str(tiny_clip_dir), "--out", str(root / "pretrain"), "--freeze", "ends",
                                   *SMALL_STEPS])
        finally:
            torch.set_num_threads(threads)
    # SFT as a user runs it: a fresh process, the encoder found inside the pretrained folder
    run = run_module("minimind_v.train.sft_vlm", "--data", tiny_world, "--init", root / "pretrain",
                     "--out", root / "sft", *SMALL_STEPS)
    assert "sft: 40 samples" in run.stdout and "freeze=all" in run.stdout
    return root


def test_stages_write_loadable_folders(stages, world_tokenizer, tiny_world):
    from minimind_v.model.vlm import MiniMindVLM
    from minimind_v.tokenizer import load_tokenizer

    lm = MiniMindForCausalLM.from_pretrained(stages / "lm")
    assert type(lm) is MiniMindForCausalLM and lm.config.dim == 128  # the tiny preset
    assert load_tokenizer(stages / "lm").get_vocab() == world_tokenizer.get_vocab()
    for stage in ("lm", "pretrain", "sft"):
        # the saved model is the checkpoint's final weights
        checkpoint = torch.load(stages / stage / CHECKPOINT, weights_only=False)
        saved = load_file(stages / stage / "model.safetensors")
        assert checkpoint["step"] == (3 if stage == "lm" else 2)
        for name, tensor in saved.items():
            assert torch.equal(checkpoint["model"][name], tensor), (stage, name)
        assert [r["step"] for r in metrics(stages / stage) if "step" in r] == list(range(1, checkpoint["step"] + 1))
    for stage in ("pretrain", "sft"):
        vlm = MiniMindVLM.from_pretrained(stages / stage)
        assert vlm.config.vision_model == "vision_encoder" and (stages / stage / "vision_encoder" / "config.json").exists()
        assert vlm.config.num_image_tokens == TINY_CLIP_TOKENS
        assert vlm.config.image_token_ids == [world_tokenizer.convert_tokens_to_ids("<|image|>")] * TINY_CLIP_TOKENS
        # Every VLM folder carries its processor: AutoProcessor opens it, with no remote code.
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(stages / stage)
        assert (stages / stage / "processor_config.json").exists()
        assert type(processor).__name__ == "MiniMindVProcessor" and processor.num_image_tokens == TINY_CLIP_TOKENS

    # Pretraining here trains the projection and the end layers only (--freeze ends); SFT trains all.
    lm_w, pre_w, sft_w = (load_file(stages / s / "model.safetensors") for s in ("lm", "pretrain", "sft"))
    for name, tensor in lm_w.items():
        frozen = not name.startswith(("layers.0.", "layers.3."))
        assert torch.equal(pre_w[name], tensor) == frozen, name
    assert all(not torch.equal(sft_w[n], pre_w[n]) for n in pre_w if n.endswith("weight") and "norm" not in n)


def test_load_vlm_answers_batches_like_one_by_one(stages, tiny_world):
    from minimind_v.inference import answer, load_vlm

    bundle = load_vlm(stages / "sft", device="cpu")
    assert bundle.encoder.num_tokens == TINY_CLIP_TOKENS
    records = read_records(tiny_world / "eval_data.json")[:3]
    images = [tiny_world / "eval_data_images" / r["image"] for r in records]
    questions = [r["conversations"][0]["value"] for r in records]
    together = answer(bundle, images, questions, max_new_tokens=6)
    assert len(together) == 3 and all(isinstance(a, str) for a in together)
    assert together == [answer(bundle, [im], [q], max_new_tokens=6)[0] for im, q in zip(images, questions)]
    # no tag in the question: one is put in front, as in the training data
    assert answer(bundle, images[:1], ["What shape is in the center?"], max_new_tokens=6) == \
        answer(bundle, images[:1], ["<image>\nWhat shape is in the center?"], max_new_tokens=6)


def test_evaluate_prints_a_table_and_writes_consistent_figures(stages, tiny_world, tmp_path, capsys):
    from minimind_v import evaluate

    out = tmp_path / "eval.json"
    figures = evaluate.main(["--model", str(stages / "sft"), "--data", str(tiny_world), "--limit", "8",
                             "--out", str(out), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "| answer type | questions | accuracy | text-only baseline |" in printed
    assert "| **overall** | 8 |" in printed
    saved = json.loads(out.read_text())
    rows = saved["rows"]
    records = read_records(tiny_world / "eval_data.json")[:8]
    assert [r["id"] for r in rows] == [r["id"] for r in records] and saved["n"] == 8 == figures["n"]
    for row, record in zip(rows, records):
        assert row["answer"] == record["conversations"][1]["value"] and row["type"] == record["answer_type"]
        assert row["correct"] == (evaluate.normalise(row["prediction"]) == evaluate.normalise(row["answer"]))
    assert saved["overall"] == pytest.approx(sum(r["correct"] for r in rows) / 8)
    for kind, acc in saved["per_type"].items():
        of_kind = [r["correct"] for r in rows if r["type"] == kind]
        assert acc == pytest.approx(sum(of_kind) / len(of_kind))
    assert set(saved["text_only_baseline"]["per_type"]) == set(saved["per_type"])
    assert evaluate.normalise(" Top  Left. ") == "top left"


def test_accuracy_by_objects_splits_by_the_scene_size():
    from minimind_v.evaluate import accuracy_by_objects, format_objects_table

    obj = {"shape": "circle", "colour": "red", "size": "small", "position": "top"}
    records = [{"id": "a", "scene": [obj]}, {"id": "b", "scene": [obj, obj]}, {"id": "c", "scene": [obj, obj]},
               {"id": "d", "scene": [obj, obj, obj]}]
    rows = [{"id": "a", "type": "colour", "correct": True}, {"id": "b", "type": "colour", "correct": False},
            {"id": "c", "type": "count", "correct": True}, {"id": "d", "type": "colour", "correct": True}]
    # Worked out by hand: colour is right with 1 object (a), wrong with 2 (b), right with 3 (d);
    # count has one question, right, with 2 objects; overall with 2 objects: 1 of 2.
    assert accuracy_by_objects(rows, records) == {"colour": {1: 1.0, 2: 0.0, 3: 1.0}, "count": {2: 1.0},
                                                  "overall": {1: 1.0, 2: 0.5, 3: 1.0}}
    table = format_objects_table(accuracy_by_objects(rows, records)).splitlines()
    assert table[0] == "| answer type | 1 object | 2 objects | 3 objects |"
    assert table[3] == "| count | – | 100.0% | – |" and table[4] == "| overall | 100.0% | 50.0% | 100.0% |"
    with pytest.raises(ValueError, match="'e'"):
        accuracy_by_objects(rows + [{"id": "e", "type": "size", "correct": True}], records)


def test_chat_cli_streams_the_same_answer(stages, tiny_world):
    from minimind_v.inference import answer, load_vlm

    image = sorted((tiny_world / "eval_images").glob("*.png"))[0]
    question = "What colour is the circle?"
    run = run_module("minimind_v.chat", "--model", stages / "sft", "--image", image, "--max-new-tokens", "8",
                     "--device", "cpu", question)
    expected = answer(load_vlm(stages / "sft", device="cpu"), [image], [question], max_new_tokens=8)[0]
    assert run.stdout.strip() == expected


def test_chat_prompt_lookup_asks_for_it_and_says_the_same(stages, tiny_world, capsys, monkeypatch):
    from minimind_v import chat

    image = sorted((tiny_world / "eval_images").glob("*.png"))[0]
    asked, real_answer = [], chat.answer

    def recording(*args, **kwargs):
        asked.append(kwargs.get("prompt_lookup_num_tokens"))
        return real_answer(*args, **kwargs)

    monkeypatch.setattr(chat, "answer", recording)
    common = ["--model", str(stages / "sft"), "--image", str(image), "--max-new-tokens", "16", "--device", "cpu"]
    plain = chat.main([*common, "Describe this picture briefly."])
    looked_up = chat.main([*common, "--prompt-lookup", "5", "Describe this picture briefly."])
    assert asked == [None, 5] and looked_up == plain
    with pytest.raises(SystemExit) as exit_info:
        chat.main([*common, "--temperature", "0.7", "--prompt-lookup", "5", "Describe this picture briefly."])
    assert exit_info.value.code == 2 and "--prompt-lookup is for greedy answers" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        chat.main([*common, "--prompt-lookup", "-1", "Describe this picture briefly."])
    assert exit_info.value.code == 2 and "--prompt-lookup -1: give a number of tokens" in capsys.readouterr().err


def test_chat_refuses_an_empty_question(stages, tiny_world, capsys):
    from minimind_v import chat

    image = sorted((tiny_world / "eval_images").glob("*.png"))[0]
    with pytest.raises(SystemExit) as exit_info:
        chat.main(["--model", str(stages / "sft"), "--image", str(image), "  "])
    assert exit_info.value.code == 2 and "the question is empty" in capsys.readouterr().err


def test_feature_cache_training_matches_training_from_pixels(stages, tiny_world, tmp_path, alone):
    """The same first step from cached patch tokens (float16) as from the image files."""
    from minimind_v.train.vlm import run_stage

    common = ["--data", str(tiny_world), "--init", str(stages / "pretrain"), *SMALL_STEPS, "--steps", "1"]
    run_stage("sft", [*common, "--out", str(tmp_path / "files")])
    run_stage("sft", [*common, "--out", str(tmp_path / "cached"), "--feature-cache",
                      "--cache-dir", str(tmp_path / "cache")])
    assert (tmp_path / "cache" / "sft_images" / "meta.json").exists()
    assert step_losses(tmp_path / "cached")[1] == pytest.approx(step_losses(tmp_path / "files")[1], rel=1e-3)
