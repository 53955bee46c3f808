"""The distributed helpers and the tiny CLIP trained on the shapes world."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from minimind_v import probes as P
from minimind_v.data import clip_examples as E
from minimind_v.data import shapes
from minimind_v.model import tiny_clip as M
from minimind_v.train import clip as C
from minimind_v.train import distributed as D

from conftest import TORCHRUN_VARS

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = M.TinyClipConfig(vision_width=32, vision_layers=1, vision_heads=2, text_width=32, text_layers=1,
                              text_heads=2, projection_dim=16)
TINY_ARGS = ["--vision-width", "32", "--vision-layers", "1", "--vision-heads", "2", "--text-width", "32",
             "--text-layers", "1", "--text-heads", "2", "--projection-dim", "16"]


@pytest.fixture(scope="module")
def tokenizer():
    return M.build_tokenizer()


# ----------------------------------------------------------------------------- distributed.py


def test_setup_alone_has_no_process_group(alone):
    info = D.setup_distributed()
    assert (info.rank, info.world_size, info.local_rank, info.is_main, info.backend) == (0, 1, 0, True, None)
    assert not D.is_distributed() and not dist.is_initialized()
    assert info.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert torch.get_num_threads() == D.available_cores()  # alone: every core
    # The collectives degrade to no-ops / identities.
    x = torch.tensor([1.0, 3.0], requires_grad=True)
    assert torch.equal(D.all_reduce_mean(x), x.detach())
    assert D.all_gather_with_grad(x) is x
    D.barrier()
    D.cleanup_distributed()


def test_threads_never_oversubscribe(alone, monkeypatch):
    monkeypatch.setattr(D, "available_cores", lambda: 2)
    assert D.threads_per_process(1) == 2
    assert D.threads_per_process(2) == 1  # 2 processes x 1 thread on 2 cores
    assert D.threads_per_process(4) == 1  # never 0
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    assert D.threads_per_process(1) == 2  # a larger request is capped at the fair share
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert D.threads_per_process(1) == 1  # torchrun's 1 is respected


def test_setup_rejects_bad_environment(alone, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ValueError, match="RANK=5 WORLD_SIZE=2"):
        D.setup_distributed()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK"):
        D.setup_distributed()


def test_seed_everything_repeats_and_unwrap():
    D.seed_everything(3)
    a = (random.random(), torch.rand(2))
    D.seed_everything(3)
    b = (random.random(), torch.rand(2))
    assert a[0] == b[0] and torch.equal(a[1], b[1])
    model = torch.nn.Linear(2, 2)
    assert D.unwrap(model) is model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_gather_step(info, x) -> dict:
    """DDP model on this rank's half of the batch, global contrastive loss via all_gather_with_grad."""
    torch.manual_seed(0)
    model = D.wrap_ddp(torch.nn.Linear(x.shape[1], 6), info)
    b = x.shape[0] // info.world_size
    z = F.normalize(model(x[info.rank * b : (info.rank + 1) * b]), dim=-1)  # (b, 6)
    img, txt = D.all_gather_with_grad(z[:, :3]), D.all_gather_with_grad(z[:, 3:])  # (2b, 3) each
    loss = M.contrastive_loss(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), torch.tensor(5.0))
    loss.backward()
    return {"grad": D.unwrap(model).weight.grad, "loss": loss.detach(),
            "mean_rank": D.all_reduce_mean(torch.tensor(float(info.rank))),
            "info": (info.rank, info.world_size, info.backend)}


def _ddp_gather_worker(rank, world_size, port, x, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    info = D.setup_distributed()
    try:
        # The DDP model lives only inside _ddp_gather_step: it must be gone before the group is.
        torch.save(_ddp_gather_step(info, x), Path(out_dir) / f"rank{rank}.pt")
    finally:
        D.cleanup_distributed()


@pytest.mark.slow  # spawns two Python processes (~15 s, mostly imports)
def test_ddp_gather_gives_single_process_gradient(tmp_path):
    """2 gloo ranks x 4 rows == 1 process x 8 rows: same loss, same (DDP-averaged) gradient."""
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(1))
    mp.spawn(_ddp_gather_worker, args=(2, _free_port(), x, str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 6)
    z = F.normalize(model(x), dim=-1)
    loss = M.contrastive_loss(F.normalize(z[:, :3], dim=-1), F.normalize(z[:, 3:], dim=-1), torch.tensor(5.0))
    loss.backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["info"] == (rank, 2, "gloo")
        assert got["mean_rank"].item() == 0.5
        torch.testing.assert_close(got["loss"], loss.detach())
        torch.testing.assert_close(got["grad"], model.weight.grad)


# ----------------------------------------------------------------------------- retrieval metric


def test_retrieval_top1_exact_values():
    n = 64
    assert P.retrieval_top1(torch.eye(n)) == 1.0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    fixed_points = (perm == torch.arange(n)).sum().item()
    # Image i's best text is perm[i]: correct only where perm has a fixed point.
    assert P.retrieval_top1(torch.eye(n)[perm]) == pytest.approx(fixed_points / n)
    # Shuffled similarities score about 1/n on average.
    scores = [P.retrieval_top1(torch.rand(n, n, generator=torch.Generator().manual_seed(s))) for s in range(200)]
    assert abs(sum(scores) / len(scores) - 1 / n) < 0.01
    # An equivalent (same-content) text counts as a hit.
    sim = torch.eye(4)[[1, 0, 2, 3]]
    same = torch.eye(4, dtype=torch.bool)
    assert P.retrieval_top1(sim) == 0.5
    same[0, 1] = True
    assert P.retrieval_top1(sim, same) == 0.75
    with pytest.raises(ValueError, match="square"):
        P.retrieval_top1(torch.zeros(3, 4))


# ----------------------------------------------------------------------------- tokenizer, model, loss


def test_tokenizer_covers_the_shapes_world(tokenizer):
    rng = random.Random(1)
    texts = []
    for _ in range(300):
        scene = shapes.random_scene(rng)
        texts.append(shapes.caption(scene, rng))
        texts += [q for q, _, _ in shapes.questions(scene, rng)]
    enc = M.tokenize(tokenizer, texts)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert not (ids == M.UNK_ID).any()
    assert (ids[:, 0] == M.BOS_ID).all()
    last = mask.sum(1) - 1
    assert (ids[torch.arange(len(texts)), last] == M.EOS_ID).all()  # exactly one EOS, at the end
    assert ((ids == M.EOS_ID).sum(1) == 1).all()
    assert (ids[mask == 0] == M.PAD_ID).all()
    assert tokenizer.decode(M.tokenize(tokenizer, ["A large red circle."])["input_ids"][0], skip_special_tokens=True) \
        == "a large red circle ."


def test_text_pooling_takes_the_eos_position(tokenizer):
    config = M.make_clip_config(TINY_MODEL, len(tokenizer))
    assert config.text_config.eos_token_id == M.EOS_ID != 2  # 2 would switch on the legacy argmax pooling
    assert (config.text_config.pad_token_id, config.text_config.bos_token_id) == (M.PAD_ID, M.BOS_ID)
    torch.manual_seed(0)
    model = C.CLIPModel(config).eval()
    enc = M.tokenize(tokenizer, ["a red circle at the top.", "two objects: a small blue cross on the left and a large green square."])
    out = model.text_model(**enc)
    eos = enc["attention_mask"].sum(1) - 1  # found independently: the last real token
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[torch.arange(2), eos])


def test_contrastive_loss_matches_transformers_and_counts_negatives():
    g = torch.Generator().manual_seed(0)
    img, txt = F.normalize(torch.randn(6, 8, generator=g), dim=-1), F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    scale = torch.tensor(7.0)
    from transformers.models.clip.modeling_clip import image_text_contrastive_loss

    torch.testing.assert_close(M.contrastive_loss(img, txt, scale), image_text_contrastive_loss(scale * txt @ img.t()))
    # With negatives, by hand: row i's softmax over 6 captions + 12 negatives.
    neg = F.normalize(torch.randn(12, 8, generator=g), dim=-1)
    i2t = -torch.stack([torch.log_softmax(scale * img[i] @ torch.cat([txt, neg]).t(), 0)[i] for i in range(6)]).mean()
    t2i = -torch.stack([torch.log_softmax(scale * txt[i] @ img.t(), 0)[i] for i in range(6)]).mean()
    torch.testing.assert_close(M.contrastive_loss(img, txt, scale, neg), (i2t + t2i) / 2)


def test_logit_scale_is_not_weight_decayed(tokenizer):
    model = M.ContrastiveCLIP(C.CLIPModel(M.make_clip_config(TINY_MODEL, len(tokenizer))))
    groups = C.parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    members = [{names[id(p)] for p in g["params"]} for g in groups]
    [scale_group] = [g for g, m in zip(groups, members) if "clip.logit_scale" in m]
    assert [names[id(p)] for p in scale_group["params"]] == ["clip.logit_scale"]
    assert scale_group["weight_decay"] == 0.0 and scale_group["lr_multiplier"] == C.LOGIT_SCALE_LR_MULTIPLIER
    decayed = set().union(*(m for g, m in zip(groups, members) if g["weight_decay"] > 0))
    kept = set().union(*(m for g, m in zip(groups, members) if g["weight_decay"] == 0))
    assert decayed | kept == set(names.values()) and not decayed & kept  # every parameter exactly once
    assert "clip.logit_scale" not in decayed
    assert {"clip.vision_model.encoder.layers.0.mlp.fc1.weight", "object_head.weight"} <= decayed
    assert {"clip.vision_model.post_layernorm.weight", "clip.text_model.embeddings.token_embedding.weight",
            "clip.vision_model.embeddings.position_embedding.weight", "object_head.bias"} <= kept


def test_vision_embeddings_init_makes_positions_visible(tokenizer):
    torch.manual_seed(0)
    clip = C.CLIPModel(M.make_clip_config(TINY_MODEL, len(tokenizer)))
    M.init_vision_embeddings(clip)
    pos = clip.vision_model.embeddings.position_embedding.weight  # (50, 32)
    assert torch.equal(pos[0], torch.zeros(32))  # CLS
    # Patch (0, 0): every sine 0, every cosine 1 (row half, then column half).
    assert torch.allclose(pos[1], torch.tensor(([0.0] * 8 + [1.0] * 8) * 2))
    assert len({tuple(row.tolist()) for row in pos[1:]}) == 49  # 49 distinct codes
    # Patch vectors are about as long as position codes now (not ~50x longer).
    pixels = M.pixels_from_images([shapes.render_scene(shapes.random_scene(random.Random(0)))])
    patch = clip.vision_model.embeddings.patch_embedding(pixels).flatten(2)  # (1, 32, 49)
    assert 0.2 < pos[1:].norm(dim=1).mean() / patch.norm(dim=1).mean() < 5


def test_fast_pixels_equal_the_saved_image_processor():
    rng = random.Random(0)
    images = [shapes.render_scene(shapes.random_scene(rng)) for _ in range(3)]
    expected = M.make_image_processor()(images=images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(M.pixels_from_images(images), expected)
    with pytest.raises(ValueError, match="image 0 has shape"):
        M.pixels_from_images([images[0].resize((100, 100))])


@pytest.mark.parametrize("kind", ["shape", "bind", "colour", "size", "position"])
def test_hard_negatives_change_exactly_what_they_say(kind):
    rng = random.Random(kind)
    for _ in range(50):
        scene = shapes.random_scene(rng, 2, 3)
        wrong = E.hard_negative_scene(scene, kind, rng)
        shapes.validate_scene(wrong)
        assert E.content_key(wrong) != E.content_key(scene)
        assert [o["position"] for o in wrong] == sorted((o["position"] for o in wrong), key=shapes.POSITIONS.index)
        if kind == "bind" and len({o["shape"] for o in scene}) > 1:
            # Shapes trade places; the multiset of shapes and everything else stay.
            assert sorted(o["shape"] for o in wrong) == sorted(o["shape"] for o in scene)
            assert [(o["colour"], o["size"], o["position"]) for o in wrong] == [(o["colour"], o["size"], o["position"]) for o in scene]
        elif kind != "bind":
            other = {"shape": ("colour", "size", "position"), "colour": ("shape", "size", "position"),
                     "size": ("shape", "colour", "position"), "position": ("shape", "colour", "size")}[kind]
            unchanged = sorted(tuple(o[a] for a in other) for o in scene)
            assert sorted(tuple(o[a] for a in other) for o in wrong) == unchanged


def test_hard_negatives_fall_back_when_impossible():
    full = [{"shape": "circle", "colour": "red", "size": "small", "position": p} for p in shapes.POSITIONS]
    for kind in ("position", "bind"):  # no empty cell; all shapes equal
        wrong = E.hard_negative_scene(full, kind, random.Random(0))
        assert sum(o["shape"] != "circle" for o in wrong) == 1
    with pytest.raises(ValueError, match="unknown kind 'texture'"):
        E.hard_negative_scene(full, "texture", random.Random(0))


def test_training_batch_is_deterministic_and_independent_of_sharding(tokenizer):
    whole = C.training_batch(tokenizer, 0, range(8), 2)
    halves = [C.training_batch(tokenizer, 0, range(0, 4), 2), C.training_batch(tokenizer, 0, range(4, 8), 2)]
    torch.testing.assert_close(torch.cat([h["pixel_values"] for h in halves]), whole["pixel_values"])
    texts = lambda b, n: tokenizer.batch_decode(b["input_ids"][:n], skip_special_tokens=True)  # noqa: E731
    assert texts(halves[0], 4) + texts(halves[1], 4) == texts(whole, 8)
    assert whole["input_ids"].shape[0] == 8 * 3  # 8 captions + 8 x 2 hard negatives
    assert set(texts(whole, 8)).isdisjoint(tokenizer.batch_decode(whole["input_ids"][8:], skip_special_tokens=True))


def test_training_skips_held_out_pictures():
    scene, _ = E.training_scene(0, 5)
    other, _ = E.training_scene(0, 5, frozenset({shapes.scene_key(scene)}))
    assert shapes.scene_key(other) != shapes.scene_key(scene)


def test_object_targets_match_the_picture():
    # Squares fill their box, so a patch is marked exactly when the pixel at its centre is the object's.
    rng = random.Random(2)
    for _ in range(20):
        scene = [dict(o, shape="square", colour=c)  # distinct colours, so a pixel names its object
                 for o, c in zip(shapes.random_scene(rng, 1, 3), rng.sample(shapes.COLOURS, 3))]
        masks, labels = E.object_patches(scene), E.object_labels(scene)  # (9, 49), (4, 9)
        pixels = torch.from_numpy(np.asarray(shapes.render_scene(scene)).copy())  # (224, 224, 3)
        centres = torch.arange(7) * 32 + 16
        centre_rgb = pixels[centres][:, centres].reshape(49, 3)
        for obj in scene:
            cell = shapes.POSITIONS.index(obj["position"])
            colour = torch.tensor(shapes.COLOUR_RGB[obj["colour"]], dtype=torch.uint8)
            assert torch.equal(masks[cell].bool(), (centre_rgb == colour).all(1))
            assert masks[cell].sum() >= 1
            assert labels[:, cell].tolist() == [shapes.SHAPES.index("square"), shapes.COLOURS.index(obj["colour"]),
                                                shapes.SIZES.index(obj["size"]), cell]
        empty = [c for c, p in enumerate(shapes.POSITIONS) if p not in {o["position"] for o in scene}]
        assert (labels[:, empty] == -1).all() and (masks[empty] == 0).all()
        per_patch = E.patch_labels(masks, labels)  # (4, 49): each patch carries its object's labels
        for p in range(49):
            cells = masks[:, p].nonzero().flatten().tolist()
            assert per_patch[:, p].tolist() == (labels[:, cells[0]].tolist() if cells else [-1] * 4)
    tokens = torch.randn(2, 49, 5)
    masks = torch.zeros(2, 9, 49)
    masks[0, 0, [3, 10]] = 1
    out = P.object_tokens(tokens, masks)
    torch.testing.assert_close(out[0, 0], (tokens[0, 3] + tokens[0, 10]) / 2)
    assert torch.equal(out[1], torch.zeros(9, 5))  # no patches: zeros, not NaN


def test_scene_counts_by_hand():
    scene = [
        {"shape": "circle", "colour": "red", "size": "small", "position": "top left"},
        {"shape": "circle", "colour": "blue", "size": "large", "position": "center"},
        {"shape": "cross", "colour": "red", "size": "small", "position": "bottom"},
    ]
    counts = dict(zip(E.COUNTED, E.scene_counts(scene).tolist()))
    assert counts[("shape", "circle")] == 2 and counts[("shape", "cross")] == 1 and counts[("shape", "square")] == 0
    assert counts[("colour", "red")] == 2 and counts[("colour", "blue")] == 1 and counts[("colour", "green")] == 0
    assert counts[("size", "small")] == 2 and counts[("size", "large")] == 1
    assert counts[("all", None)] == 3
    assert len(E.COUNTED) == len(shapes.SHAPES) + len(shapes.COLOURS) + len(shapes.SIZES) + 1


def test_count_loss_by_hand():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, len(E.COUNTED), E.MAX_COUNT + 1, generator=g)
    counts = torch.randint(0, 4, (2, len(E.COUNTED)), generator=g)
    by_hand = -sum(torch.log_softmax(logits[b, k], 0)[counts[b, k]] for b in range(2) for k in range(len(E.COUNTED)))
    torch.testing.assert_close(M.count_loss(logits, counts), by_hand / (2 * len(E.COUNTED)))


def test_object_loss_is_the_mean_over_labelled_patches():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 9, 20, generator=g)
    labels = torch.full((2, 4, 9), -1)
    labels[0, :, 4] = torch.tensor([1, 2, 0, 4])
    labels[1, :, 0] = torch.tensor([3, 4, 1, 0])
    labels[1, :, 8] = torch.tensor([0, 0, 1, 8])
    objects = [(0, 4), (1, 0), (1, 8)]
    by_hand = sum(
        -torch.log_softmax(logits[b, c, lo:hi], 0)[labels[b, row, c]]
        for b, c in objects for row, (lo, hi) in enumerate([(0, 4), (4, 9), (9, 11), (11, 20)])
    ) / (4 * len(objects))
    torch.testing.assert_close(M.object_loss(logits, labels), by_hand)
    # Split over two "ranks" (1 and 2 objects), normalised by the mean count 1.5: the average matches.
    halves = [M.object_loss(logits[i : i + 1], labels[i : i + 1], count=1.5) for i in range(2)]
    torch.testing.assert_close((halves[0] + halves[1]) / 2, by_hand)


def test_a_few_steps_reduce_the_contrastive_loss(tokenizer):
    torch.manual_seed(0)
    clip = C.CLIPModel(M.make_clip_config(TINY_MODEL, len(tokenizer)))
    M.init_vision_embeddings(clip)
    model = M.ContrastiveCLIP(clip)
    opt = torch.optim.AdamW(C.parameter_groups(model, 0.1), lr=3e-3)
    batch = C.training_batch(tokenizer, 0, range(16), 1)
    losses, aux = [], []
    for _ in range(25):
        image, text, scale, object_logits, count_logits = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        loss = M.contrastive_loss(image, text[:16], scale, text[16:])
        object_loss = M.object_loss(object_logits, batch["patch_labels"]) + M.count_loss(count_logits, batch["counts"])
        opt.zero_grad()
        (loss + object_loss).backward()
        opt.step()
        losses.append(loss.item())
        aux.append(object_loss.item())
    assert losses[-1] < 0.75 * losses[0]
    assert aux[-1] < 0.75 * aux[0]


# ----------------------------------------------------------------------------- linear probe


class _PatchColourEncoder(torch.nn.Module):
    """Stand-in encoder: each token is its 32x32 patch's mean pixel (CLS: the image mean). (B, 50, 3)."""

    def forward(self, pixel_values):
        patches = F.avg_pool2d(pixel_values, 32).flatten(2).transpose(1, 2)  # (B, 49, 3)
        return torch.cat([patches.mean(1, keepdim=True), patches], dim=1)


class _PatchIndexEncoder(torch.nn.Module):
    """Stand-in encoder whose tokens know only where they are: patch k is the one-hot of k. (B, 50, 50)."""

    def forward(self, pixel_values):
        return torch.eye(50).expand(pixel_values.shape[0], 50, 50)


class _ConstantEncoder(torch.nn.Module):
    def forward(self, pixel_values):
        return torch.zeros(pixel_values.shape[0], 50, 4)


@pytest.mark.parametrize("features", P.PROBE_FEATURES)
def test_linear_probe_reads_the_object_patches(features):
    # The patches under an object have the object's colour: a probe reading the right tokens finds it.
    seen = P.linear_probe(_PatchColourEncoder(), n_train=300, n_test=200, seed=0, features=features)
    assert seen["colour"] > 0.95
    # Features that carry nothing: no better than guessing the most common class.
    blind = P.linear_probe(_ConstantEncoder(), n_train=300, n_test=200, seed=0, features=features)
    assert blind["shape"] < 0.4 and blind["colour"] < 0.35 and blind["size"] < 0.65 and blind["position"] < 0.25


@pytest.mark.parametrize("features", ["object", "centre"])
def test_linear_probe_reads_position_from_where_the_tokens_are(features):
    # Tokens that carry nothing but their own patch index: the grid cell is readable, colour is not.
    seen = P.linear_probe(_PatchIndexEncoder(), n_train=300, n_test=200, seed=0, features=features)
    assert seen["position"] > 0.95 and seen["colour"] < 0.35


def test_linear_probe_rejects_unknown_features():
    with pytest.raises(ValueError, match="features"):
        P.linear_probe(_ConstantEncoder(), 10, 10, features="cls")



def _scenes(n, seed):
    rng = random.Random(seed)
    return [shapes.random_scene(rng) for _ in range(n)]


def test_scene_labels_name_each_cell_as_worked_out_by_hand():
    scene = [{"shape": "triangle", "colour": "blue", "size": "large", "position": "top right", "offset": [0, 0]},
             {"shape": "circle", "colour": "red", "size": "small", "position": "bottom left", "offset": [0, 0]}]
    content, size = P.scene_labels([scene])
    # triangle is shape 2, blue colour 2: 1 + 2 * 5 + 2 = 13 in cell 2; circle/red: 1 in cell 6.
    assert content.tolist() == [[0, 0, 13, 0, 0, 0, 1, 0, 0]]
    assert size.tolist() == [[0, 0, 2, 0, 0, 0, 1, 0, 0]]


def test_scene_probe_reads_tokens_that_spell_the_scene_and_not_tokens_that_do_not():
    scenes = _scenes(1200, seed=3)
    content, size = P.scene_labels(scenes)
    # Tokens that spell each cell out (one-hot content and size per cell): every scene is readable.
    spelled = torch.cat([F.one_hot(content, P.CELL_CLASSES), F.one_hot(size, P.SIZE_CLASSES)], -1).float()
    seen = P.scene_probe(spelled, scenes, n_test=300)
    assert seen == {"cells": 1.0, "objects": 1.0, "scenes": 1.0}
    # Noise tokens: at best "all empty" for the cells, so almost no object and no whole scene.
    noise = torch.randn(1200, 9, 4, generator=torch.Generator().manual_seed(0))
    blind = P.scene_probe(noise, scenes, n_test=300)
    empty = (content[900:] == 0).float().mean().item()
    assert blind["objects"] < 0.1 and blind["scenes"] < 0.1 and blind["cells"] < empty + 0.05


def test_attribute_labels_name_each_cell_as_worked_out_by_hand():
    scene = [{"shape": "triangle", "colour": "blue", "size": "large", "position": "top right", "offset": [0, 0]},
             {"shape": "circle", "colour": "red", "size": "small", "position": "bottom left", "offset": [0, 0]}]
    labels = P.attribute_labels([scene])
    # (shape, colour, size), 0 for empty: triangle 1 + 2, blue 1 + 2, large 1 + 1 in cell 2; circle/red/small in cell 6.
    assert labels[0, 2].tolist() == [3, 3, 2] and labels[0, 6].tolist() == [1, 1, 1]
    assert labels[0].sum().item() == 8 + 3  # every other cell empty


def test_pair_probe_reads_a_pair_never_trained_on_only_from_tokens_that_code_attributes_apart():
    held = [("red", "triangle"), ("blue", "cross")]
    scenes = _scenes(2400, seed=4)
    has_pair = [any((o["colour"], o["shape"]) in held for o in s) for s in scenes]
    train = [s for s, h in zip(scenes, has_pair) if not h][:1200]
    test = scenes[-600:]
    n_unseen = sum((o["colour"], o["shape"]) in held for s in test for o in s)

    def apart(ss):  # each cell's shape, colour and size, each one-hot on its own
        labels = P.attribute_labels(ss)
        return torch.cat([F.one_hot(labels[..., h], k) for h, k in enumerate(P.ATTRIBUTE_CLASSES)], -1).float()

    def joint(ss):  # each cell's colour-shape pair as one code: a pair never trained on has a code never seen
        content, size = P.scene_labels(ss)
        return torch.cat([F.one_hot(content, P.CELL_CLASSES), F.one_hot(size, P.SIZE_CLASSES)], -1).float()

    read = P.pair_probe(apart(train), train, apart(test), test, held)
    assert read == {"seen": 1.0, "unseen": 1.0, "n_seen": read["n_seen"], "n_unseen": n_unseen}
    assert read["n_seen"] == sum(len(s) for s in test) - n_unseen and n_unseen > 50
    # (the never-seen code also spoils the other cells of its picture: one map reads them all)
    blind = P.pair_probe(joint(train), train, joint(test), test, held)
    assert blind["unseen"] < 0.5 < blind["seen"]
    with pytest.raises(ValueError, match="token rows"):
        P.pair_probe(joint(train)[:-1], train, joint(test), test, held)


def test_scene_probe_refuses_a_test_split_it_cannot_have():
    scenes = _scenes(10, seed=0)
    with pytest.raises(ValueError, match="n_test"):
        P.scene_probe(torch.zeros(10, 2, 2), scenes, n_test=10)
    with pytest.raises(ValueError, match="token rows"):
        P.scene_probe(torch.zeros(9, 2, 2), scenes, n_test=2)


# ----------------------------------------------------------------------------- the entry point


def _train_args(out, *extra):
    return ["--out", str(out), "--steps", "3", "--batch-size", "8", "--negatives", "2", "--eval-every", "0",
            "--eval-pairs", "64", "--probe-train", "0", "--log-every", "1", "--no-progress", *TINY_ARGS, *extra]


def test_cli_saves_a_folder_vision_encoder_opens(alone, tmp_path, capsys):
    from minimind_v.model.vision import VisionEncoder

    data = tmp_path / "world"
    shapes.generate_world(data, shapes.ShapesWorldConfig(seed=0, n_pretrain=1, n_sft=1, n_eval=64, n_eval_images=1,
                                                         workers=1), progress=False)
    out = tmp_path / "clip"
    summary = C.main(_train_args(out, "--data", str(data)))
    assert "held-out top-1 retrieval" in capsys.readouterr().out
    assert str(data / "eval_data.json") in summary["held_out"]
    encoder = VisionEncoder.from_pretrained(out)
    rng = random.Random(0)
    images = [shapes.render_scene(shapes.random_scene(rng)) for _ in range(3)]
    tokens = encoder(encoder.preprocess(images))
    assert tokens.shape == (3, 50, 32)
    # The processor saved with the model gives the pixels training used.
    torch.testing.assert_close(encoder.preprocess(images), M.pixels_from_images(images))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3]
    assert lines[-1]["retrieval_top1"] == summary["retrieval_top1"]
    # Retrieval from the saved folder agrees with the summary.
    clip, tokenizer = M.load_clip(out)
    assert P.retrieval_accuracy(clip, tokenizer, P.load_held_out(data, n=1024), n=64) == pytest.approx(
        summary["retrieval_top1"])
    with pytest.raises(ValueError, match="at least n=64"):
        P.retrieval_accuracy(clip, tokenizer, P.load_held_out(data, n=10), n=64)
    with pytest.raises(FileNotFoundError, match="eval_data.json"):
        P.load_held_out(tmp_path / "nowhere")


def test_cli_rejects_bad_arguments(alone, tmp_path):
    with pytest.raises(SystemExit):
        C.main(_train_args(tmp_path / "a", "--batch-size", "0"))
    with pytest.raises(SystemExit):
        C.main(_train_args(tmp_path / "b", "--eval-pairs", "100"))


@pytest.mark.slow
def test_torchrun_two_processes_match_one(alone, tmp_path):
    """The same 3 steps under torchrun (2 CPU ranks, gloo) and alone: same losses, same weights."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "minimind_v.train.clip", *_train_args(tmp_path / "ddp")]
    run = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "on 2 process(es)" in run.stdout
    C.main(_train_args(tmp_path / "alone"))

    def losses(folder):
        return [r["loss"] for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "alone"), abs=1e-3)
    ddp, single = (C.CLIPModel.from_pretrained(tmp_path / name).state_dict() for name in ("ddp", "alone"))
    for name, tensor in single.items():
        torch.testing.assert_close(ddp[name], tensor, atol=1e-4, rtol=1e-3, msg=name)


def test_retrieval_leaves_out_questions_about_two_pictures(tmp_path):
    """World 2's held-out split holds two-picture records (``scenes``, no one ``scene``): the
    tiny CLIP's retrieval reads the single-picture ones, each with its own scene and image."""
    config = shapes.ShapesWorldConfig(seed=1, n_pretrain=4, n_sft=4, n_eval=60, workers=1,
                                      question_types=shapes.ANSWER_TYPES + (shapes.TWO_PICTURES,))
    shapes.generate_world(tmp_path / "w", config, progress=False)
    records = json.loads((tmp_path / "w/eval_data.json").read_text())
    single = [r for r in records if "scene" in r]
    assert 0 < len(single) < len(records)  # both kinds are there
    held = P.load_held_out(tmp_path / "w")
    assert held.scenes == [r["scene"] for r in single]
    assert held.pixel_values.shape[0] == len(held.captions) == len(single)
