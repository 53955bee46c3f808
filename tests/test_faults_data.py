"""Faults in the data and evaluation half: bad records, bad pictures, crafted paths and caches.

Every bad input either stops the run with an error naming the record (or the field) and the
file, or, when skipping, is counted and the run goes on. Nothing a file names reaches outside its
folder: a victim file outside is checked to be unread, undeleted and unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from conftest import REPO, TINY_CLIP_TOKENS, subprocess_env
from minimind_v import evaluate as evaluation
from minimind_v.data import datasets as datasets_module
from minimind_v.data import records as R
from minimind_v.data.records import find_image
from minimind_v.data.datasets import ChatDataset, DataError, collate, read_records
from minimind_v.data.features import FAULT_ENV, META_FILE, FeatureCache, StaleCacheError, ensure_cache
from minimind_v.data.images import ImageError
from minimind_v.inference import LoadedVLM

N = TINY_CLIP_TOKENS


# ----------------------------------------------------------------------------- a small world to break


@pytest.fixture
def world(tiny_world, tmp_path) -> Path:
    """6 SFT records and 6 eval questions with their images, copied so they can be broken."""
    out = tmp_path / "world"
    for json_name, folder in (("sft_data.json", "sft_images"), ("eval_data.json", "eval_data_images")):
        (out / folder).mkdir(parents=True)
        records = read_records(tiny_world / json_name)[:6]
        for r in records:
            shutil.copy(find_image(tiny_world / folder, r["image"]), out / folder / r["image"])
        (out / json_name).write_text(json.dumps(records), encoding="utf-8")
    return out


@pytest.fixture
def victim(tmp_path) -> Path:
    """A perfectly good picture outside every dataset folder: reading it would succeed."""
    path = tmp_path / "outside" / "victim.png"
    path.parent.mkdir()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(path)
    return path


@pytest.fixture
def opened(monkeypatch) -> list[Path]:
    """Every path the dataset and the evaluation hand to load_image."""
    seen = []
    for module in (datasets_module, evaluation):
        real = module.load_image

        def spy(path, real=real):
            seen.append(Path(path).resolve())
            return real(path)

        monkeypatch.setattr(module, "load_image", spy)
    return seen


def rewrite(folder: Path, json_name: str, index: int, change) -> list:
    records = read_records(folder / json_name)
    records[index] = change(records[index])
    (folder / json_name).write_text(json.dumps(records), encoding="utf-8")
    return records


def with_turns(r, *values):
    return {**r, "conversations": [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]}


def question(r):
    return r["conversations"][0]["value"]


# Each bad record kind: (change to record #2, regex of the error, kind counted under skip).
# The record's id and its file are in every message.
BAD_RECORDS = {
    "no conversations": (lambda r, v: {k: x for k, x in r.items() if k != "conversations"},
                         "needs a 'conversations' list", R.NO_CONVERSATION),
    "single turn": (lambda r, v: {**r, "conversations": r["conversations"][:1]},
                    "needs a 'conversations' list with a question and an answer", R.NO_CONVERSATION),
    "two image tags": (lambda r, v: with_turns(r, "<image> <image> " + question(r).replace("<image>", ""), "red"),
                       "2 '<image>' tags, expected exactly 1", R.IMAGE_TAGS),
    "empty answer": (lambda r, v: with_turns(r, question(r), ""), r"turn 1 \(an answer\) is empty", R.EMPTY_ANSWER),
    "blank answer": (lambda r, v: with_turns(r, question(r), " \n\t "), r"turn 1 \(an answer\) is empty",
                     R.EMPTY_ANSWER),
    "no image": (lambda r, v: {k: x for k, x in r.items() if k != "image"}, "has no 'image' file name",
                 R.NO_IMAGE_NAME),
    "absolute image path": (lambda r, v: {**r, "image": str(v)}, "must be a relative name", R.IMAGE_OUTSIDE),
    "dot-dot image path": (lambda r, v: {**r, "image": "../../outside/victim.png"}, "must be a relative name",
                           R.IMAGE_OUTSIDE),
    "symlink out": (lambda r, v: {**r, "image": "link.png"}, r"leads outside .*through a link", R.IMAGE_OUTSIDE),
}


def break_record(world, json_name, folder, victim, name):
    change, message, kind = BAD_RECORDS[name]
    if name == "symlink out":
        (world / folder / "link.png").symlink_to(victim)
    records = rewrite(world, json_name, 2, lambda r: change(r, victim))
    return records, message, kind


def sft(world, tokenizer, encoder, **kw) -> ChatDataset:
    return ChatDataset(world / "sft_data.json", tokenizer, N, image_dir=world / "sft_images",
                       preprocess=encoder.preprocess, **kw)


# ----------------------------------------------------------------------------- training records


@pytest.mark.parametrize("name", BAD_RECORDS)
def test_bad_training_record_is_named_or_counted(world, world_tokenizer, tiny_encoder, victim, opened, name):
    records, message, kind = break_record(world, "sft_data.json", "sft_images", victim, name)
    rid = records[2]["id"]
    strict = sft(world, world_tokenizer, tiny_encoder)  # start-up reads no record: it fails when drawn
    with pytest.raises(DataError, match=rf"record '{rid}' in .*sft_data.json.*{message}") as caught:
        strict[2]
    assert caught.value.kind == kind and caught.value.record == rid
    skipping = sft(world, world_tokenizer, tiny_encoder, skip_bad_samples=True)
    assert collate(list(skipping)).ids == [r["id"] for i, r in enumerate(records) if i != 2]
    assert [(s.id, s.kind) for s in skipping.skipped] == [(rid, kind)]
    assert victim.resolve() not in opened  # refused by name, never opened
    assert "200" not in str(caught.value) and "PNG" not in str(caught.value)


def test_a_picture_that_fails_when_drawn_is_dropped_from_its_batch(world, world_tokenizer, tiny_encoder):
    records = read_records(world / "sft_data.json")
    strict = sft(world, world_tokenizer, tiny_encoder)
    skipping = sft(world, world_tokenizer, tiny_encoder, skip_bad_samples=True)
    assert len(skipping) == 6 and not skipping.skipped  # nothing is read before a sample is drawn
    broken = world / "sft_images" / records[4]["image"]
    broken.write_bytes(broken.read_bytes()[:60])  # ...and breaks during the run

    with pytest.raises(DataError, match=rf"record '{records[4]['id']}' in .*sft_data.json: image "
                                        rf"'{broken.name}': .*{broken.name}.*truncated or corrupt") as caught:
        strict[4]
    assert caught.value.kind == R.UNREADABLE_IMAGE
    # Under skip the batch goes on without it and says what it dropped; the run continues.
    loader = DataLoader(skipping, batch_size=3, shuffle=False, collate_fn=collate)
    batches = list(loader)
    assert [b.ids for b in batches] == [[r["id"] for r in records[:3]], [records[3]["id"], records[5]["id"]]]
    assert batches[1].images.shape == (2, 3, 64, 64) and batches[1].input_ids.shape[0] == 2
    assert [(d.id, d.kind) for d in batches[1].dropped] == [(records[4]["id"], R.UNREADABLE_IMAGE)]
    assert broken.name in batches[1].dropped[0].message and not batches[0].dropped
    # A batch whose every picture failed is empty, with nothing to learn from, not an error.
    empty = collate([skipping[4], skipping[4]])
    assert empty.ids == [] and empty.input_ids.shape[0] == 0 and empty.n_targets == 0 and len(empty.dropped) == 2
    assert empty.to("cpu").dropped == empty.dropped


def test_skip_report_keeps_every_skipped_record(world, world_tokenizer, tiny_encoder):
    records = read_records(world / "sft_data.json")
    records = records + [{**records[i % 6], "id": f"extra{i}"} for i in range(8)]
    for i in range(6, 13):  # seven bad ones: five empty answers, two without conversations
        records[i] = with_turns(records[i], question(records[i]), "") if i < 11 else \
            {k: v for k, v in records[i].items() if k != "conversations"}
    (world / "sft_data.json").write_text(json.dumps(records), encoding="utf-8")
    ds = sft(world, world_tokenizer, tiny_encoder, skip_bad_samples=True)
    assert len(collate(list(ds)).ids) == 7 and [s.id for s in ds.skipped] == [f"extra{i}" for i in range(7)]
    summary = ds.skip_summary(examples=3)
    assert summary.startswith("skipped 7 bad sample(s) (5 empty answer, 2 no question and answer)")
    assert all(f"'extra{i}'" in summary for i in range(3)) and "and 4 more" in summary


def test_text_only_datasets_refuse_empty_answers_too(world, world_tokenizer):
    rewrite(world, "sft_data.json", 1, lambda r: with_turns(r, question(r), "   "))
    with pytest.raises(DataError, match=r"record '.*' in .*sft_data.json: turn 1 \(an answer\) is empty"):
        ChatDataset(world / "sft_data.json", world_tokenizer, text_only=True)[1]
    ds = ChatDataset(world / "sft_data.json", world_tokenizer, text_only=True, skip_bad_samples=True)
    assert len(collate(list(ds)).ids) == 5 and ds.skipped[0].kind == R.EMPTY_ANSWER


# ----------------------------------------------------------------------------- the feature cache


def test_cache_build_skips_unreadable_images_and_records_them(world, world_tokenizer, tiny_encoder, tmp_path):
    records = read_records(world / "sft_data.json")
    images, cache_dir = world / "sft_images", tmp_path / "cache"
    bad = images / records[1]["image"]
    bad.write_text("not a picture")
    with pytest.raises(ImageError, match=rf"image '{bad.name}' in .*sft_images.*not an image file.*skip"):
        ensure_cache(tiny_encoder, images, cache_dir, progress=False)
    assert not (cache_dir / META_FILE).exists()

    cache = ensure_cache(tiny_encoder, images, cache_dir, progress=False, skip_bad_images=True)
    assert bad.name not in cache and set(cache.unreadable) == {bad.name} and str(bad) in cache.unreadable[bad.name]
    assert len(cache.index) == 5
    with pytest.raises(KeyError, match="could not be read when the cache was built"):
        cache[bad.name]
    built = json.loads((cache_dir / META_FILE).read_text())["built_at"], cache.meta["features_file"]
    again = ensure_cache(tiny_encoder, images, cache_dir, progress=False, skip_bad_images=True)
    assert (again.meta["built_at"], again.meta["features_file"]) == built  # reused, not rebuilt

    skipping = ChatDataset(world / "sft_data.json", world_tokenizer, N, feature_cache=again, skip_bad_samples=True)
    assert collate(list(skipping)).ids == [r["id"] for i, r in enumerate(records) if i != 1]
    assert [(s.id, s.kind) for s in skipping.skipped] == [(records[1]["id"], R.UNREADABLE_IMAGE)]
    strict = ChatDataset(world / "sft_data.json", world_tokenizer, N, feature_cache=again)
    with pytest.raises(DataError, match=rf"record '{records[1]['id']}' in .*: image '{bad.name}' could not be read"):
        strict[1]
    # Without skipping, a cache that left images out is not good enough: the rebuild names the file.
    with pytest.raises(ImageError, match=bad.name):
        ensure_cache(tiny_encoder, images, cache_dir, progress=False)


@pytest.fixture
def small_cache(tiny_world, tiny_encoder, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in sorted(os.listdir(tiny_world / "sft_images"))[:4]:
        shutil.copy(tiny_world / "sft_images" / name, images / name)
    cache = FeatureCache.build(tiny_encoder, images, tmp_path / "cache", progress=False)
    return images, tmp_path / "cache", cache


def craft_meta(cache_dir: Path, **changes) -> None:
    meta = json.loads((cache_dir / META_FILE).read_text())
    (cache_dir / META_FILE).write_text(json.dumps({**meta, **changes}))


@pytest.mark.parametrize("how", ["absolute", "dot-dot", "dot-dot inside a valid-looking name", "symlink out"])
def test_crafted_features_file_cannot_read_or_delete_outside(small_cache, tiny_encoder, tmp_path, how):
    images, cache_dir, cache = small_cache
    # The victim is a token file of exactly the right shape: reading it would be accepted.
    victim = tmp_path / "outside.npy"
    np.save(victim, np.full(cache.features.shape, 7, dtype=np.float16))
    content = victim.read_bytes()
    name = {"absolute": str(victim), "dot-dot": "../outside.npy",
            "dot-dot inside a valid-looking name": "features-000000000000.npy/../../outside.npy",
            "symlink out": "features-0123456789ab.npy"}[how]
    if how == "symlink out":
        (cache_dir / name).symlink_to(victim)
    craft_meta(cache_dir, features_file=name)

    with pytest.raises(StaleCacheError, match="features_file"):
        FeatureCache.open(cache_dir, tiny_encoder, image_dir=images)
    rebuilt = ensure_cache(tiny_encoder, images, cache_dir, progress=False)  # refused as stale: rebuilt
    assert not (rebuilt.get(rebuilt.names) == 7).all()
    assert victim.read_bytes() == content  # not deleted, not changed
    assert FeatureCache.open(cache_dir, tiny_encoder, image_dir=images).names == cache.names


@pytest.mark.parametrize("field, value", [("names", ["../outside.png"]), ("names", ["/etc/hostname"]),
                                          ("dtype", "load"), ("num_tokens", "5"), ("image_stats", [[1]]),
                                          ("unreadable", {"someone-else.png": "x"})])
def test_crafted_meta_fields_are_refused_by_name(small_cache, tiny_encoder, field, value):
    images, cache_dir, cache = small_cache
    if field == "names":
        value = value + cache.names[1:]
    craft_meta(cache_dir, **{field: value})
    with pytest.raises(StaleCacheError, match=rf"meta.json field '{field}'"):
        FeatureCache.open(cache_dir, tiny_encoder)


def pickle_bomb(path: Path, marker: Path) -> None:
    """An object-array .npy whose element, when unpickled, creates `marker`."""

    class Bomb:
        def __reduce__(self):
            return open, (str(marker), "w")  # unpickling calls open(marker, "w"): the file appears

    array = np.empty((1,), dtype=object)
    array[0] = Bomb()
    with open(path, "wb") as handle:
        np.save(handle, array, allow_pickle=True)


def test_a_pickled_features_file_runs_no_code(small_cache, tiny_encoder, tmp_path):
    images, cache_dir, cache = small_cache
    # The payload works: loading it with pickling allowed does create its marker.
    pickle_bomb(tmp_path / "proof.npy", tmp_path / "proof-marker")
    np.load(tmp_path / "proof.npy", allow_pickle=True)
    assert (tmp_path / "proof-marker").exists()

    marker = tmp_path / "marker"
    pickle_bomb(cache_dir / cache.meta["features_file"], marker)
    with pytest.raises(StaleCacheError, match="cannot read"):
        FeatureCache.open(cache_dir, tiny_encoder)
    with pytest.raises(StaleCacheError):
        FeatureCache(cache_dir, cache.meta).features  # the lazy path refuses it too
    assert not marker.exists()
    ensure_cache(tiny_encoder, images, cache_dir, progress=False)  # and it is rebuilt
    assert not marker.exists()


def test_links_out_of_the_image_folder_are_not_cache_images(small_cache, tiny_encoder, victim):
    images, cache_dir, cache = small_cache
    (images / "zz_link.png").symlink_to(victim)
    rebuilt = ensure_cache(tiny_encoder, images, cache_dir, progress=False)  # the folder's images
    assert rebuilt.names == cache.names
    with pytest.raises(ImageError, match="zz_link.png.*through a link"):
        FeatureCache.build(tiny_encoder, images, cache_dir, names=["zz_link.png"], progress=False)
    kept = FeatureCache.build(tiny_encoder, images, cache_dir, names=[*cache.names, "zz_link.png"],
                              progress=False, skip_bad_images=True)
    assert "zz_link.png" not in kept and "refused" in kept.unreadable["zz_link.png"]
    # reopening does not see the refused link as a change (no rebuild loop)
    assert ensure_cache(tiny_encoder, images, cache_dir, names=[*cache.names, "zz_link.png"], progress=False,
                        skip_bad_images=True).meta["built_at"] == kept.meta["built_at"]


KILLED_BUILD = textwrap.dedent("""
    import sys
    from minimind_v.data.features import FeatureCache
    from minimind_v.model.vision import VisionEncoder
    clip, images, cache = sys.argv[1:4]
    FeatureCache.build(VisionEncoder.from_pretrained(clip), images, cache, batch_size=8, progress=False)
""")


@pytest.mark.parametrize("point, previous", [("batch:2", True), ("commit", False)])
def test_kill_9_mid_build_then_ensure_cache_equals_an_uninterrupted_build(
        tiny_world, tiny_clip_dir, tiny_encoder, tmp_path, point, previous):
    images, cache_dir = tiny_world / "sft_images", tmp_path / "cache"
    names = sorted(os.listdir(images))
    old = FeatureCache.build(tiny_encoder, images, cache_dir, names=names[:8], batch_size=8,
                             progress=False) if previous else None
    run = subprocess.run([sys.executable, "-c", KILLED_BUILD, str(tiny_clip_dir), str(images), str(cache_dir)],
                         cwd=REPO, env={**subprocess_env(), FAULT_ENV: point}, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    # What the killed build left is never opened as a valid cache: the old one, or none.
    if previous:
        kept = FeatureCache.open(cache_dir, tiny_encoder, image_dir=images)
        assert kept.names == names[:8] and torch.equal(kept.get(names[:8]), old.get(names[:8]))
    else:
        assert any(p.name.startswith("features-") for p in cache_dir.iterdir())  # killed after the tokens
        with pytest.raises(StaleCacheError, match="no complete feature cache"):
            FeatureCache.open(cache_dir, tiny_encoder)
    rebuilt = ensure_cache(tiny_encoder, images, cache_dir, batch_size=8, progress=False)
    reference = FeatureCache.build(tiny_encoder, images, tmp_path / "reference", batch_size=8, progress=False)
    assert rebuilt.names == reference.names == names and rebuilt.unreadable == {}
    assert torch.equal(rebuilt.get(names), reference.get(names))
    assert not any(p.name.endswith(".partial") for p in cache_dir.iterdir())


# ----------------------------------------------------------------------------- evaluation


@pytest.fixture(scope="module")
def bundle(make_tiny_vlm, world_tokenizer, tiny_encoder) -> LoadedVLM:
    model = make_tiny_vlm(seed=0).eval()
    model.attach_vision_encoder(tiny_encoder)
    return LoadedVLM.from_parts(model, world_tokenizer, tiny_encoder)


EVAL_FAULTS = {
    **BAD_RECORDS,
    "overlong question": (lambda r, v: with_turns(r, "<image> " + "what colour is it " * 200, "red"),
                          r"prompt of \d+ tokens.*max_position_embeddings=512", R.TOO_LONG),
    "corrupt image": (None, r"image '.*\.png': .*\.png.*(truncated or corrupt|not an image)", R.UNREADABLE_IMAGE),
    "missing image file": (None, r"image '.*\.png': .*\.png: no such image file", R.UNREADABLE_IMAGE),
}


def break_eval(world, victim, name):
    records = read_records(world / "eval_data.json")
    if name in BAD_RECORDS:
        records, message, kind = break_record(world, "eval_data.json", "eval_data_images", victim, name)
    else:
        change, message, kind = EVAL_FAULTS[name]
        image = world / "eval_data_images" / records[2]["image"]
        if change is not None:
            records = rewrite(world, "eval_data.json", 2, lambda r: change(r, victim))
        elif name == "corrupt image":
            image.write_bytes(image.read_bytes()[:50])
        else:
            image.unlink()
    return records, message, kind


@pytest.mark.parametrize("name", EVAL_FAULTS)
def test_bad_evaluation_input_is_named_or_skipped(world, bundle, victim, opened, name):
    records, message, kind = break_eval(world, victim, name)
    rid = records[2]["id"]
    with pytest.raises(DataError, match=rf"record '{rid}' in .*eval_data.json.*{message}") as caught:
        evaluation.evaluate_vqa(bundle, world, progress=False, max_new_tokens=2)
    assert caught.value.kind == kind
    for with_image in (True, False):  # the baseline leaves out the same questions
        result = evaluation.evaluate_vqa(bundle, world, progress=False, max_new_tokens=2, skip_bad_samples=True,
                                         with_image=with_image)
        assert [row["id"] for row in result["rows"]] == [r["id"] for i, r in enumerate(records) if i != 2]
        assert result["n"] == 5 and result["skipped"] == 1 and result["skipped_by_kind"] == {kind: 1}
        assert result["skipped_records"][0]["id"] == rid and result["skipped_records"][0]["kind"] == kind
        assert result["overall"] == pytest.approx(sum(row["correct"] for row in result["rows"]) / 5)
    assert victim.resolve() not in opened


def test_evaluation_reports_every_skipped_question(world, bundle, monkeypatch, capsys, tmp_path):
    records = read_records(world / "eval_data.json")
    broken = [0, 1, 3, 5]
    for i in broken[:3]:
        records[i] = with_turns(records[i], question(records[i]), "")
    records[5] = {**records[5], "image": "/etc/hostname"}
    (world / "eval_data.json").write_text(json.dumps(records), encoding="utf-8")
    result = evaluation.evaluate_vqa(bundle, world, progress=False, max_new_tokens=2, skip_bad_samples=True)
    assert [s["id"] for s in result["skipped_records"]] == [records[i]["id"] for i in broken]
    assert result["skipped_by_kind"] == {R.EMPTY_ANSWER: 3, R.IMAGE_OUTSIDE: 1}
    footer = evaluation.format_table(result).splitlines()[-1]
    assert footer.startswith("skipped 4 question(s), not in the accuracy (3 empty answer, 1 image path outside")
    assert all(repr(records[i]["id"]) in footer for i in broken)
    assert "| **overall** | 2 |" in evaluation.format_table(result)

    # The command line: the same, and the JSON lists every skipped record.
    monkeypatch.setattr(evaluation, "load_vlm", lambda *a, **k: bundle)
    out = tmp_path / "eval.json"
    argv = ["--model", str(tmp_path), "--data", str(world), "--out", str(out), "--device", "cpu"]
    figures = evaluation.main([*argv, "--skip-bad-samples"])
    printed = capsys.readouterr().out
    assert "skipped 4 question(s)" in printed and figures["skipped"] == 4 and figures["n"] == 2
    saved = json.loads(out.read_text())
    assert [s["id"] for s in saved["skipped_records"]] == [records[i]["id"] for i in broken]
    with pytest.raises(DataError, match=rf"record '{records[0]['id']}' in .*eval_data.json"):
        evaluation.main(argv)
    # every question bad: an error, not an accuracy of nothing
    (world / "eval_data.json").write_text(json.dumps([records[i] for i in broken]), encoding="utf-8")
    with pytest.raises(DataError, match="no question left to evaluate; skipped 4"):
        evaluation.evaluate_vqa(bundle, world, progress=False, skip_bad_samples=True)
