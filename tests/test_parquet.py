"""The original's parquet layout: rows of conversations and picture bytes, read lazily.

The truth is the row itself: decoding a sample gives back its chat (system turn included), its
labels are exactly its answers, its pictures are its bytes decoded, in tag order. The JSON and the
parquet shapes worlds give the same token ids, labels and pixels for the same record.
"""

from __future__ import annotations

import io
import json
import pickle
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import TINY_CLIP_TOKENS
from minimind_v.data import records as R
from minimind_v.data.datasets import ChatDataset, DataError, collate, open_chat_dataset, resolve_data
from minimind_v.data.images import decode_picture
from minimind_v.data.parquet import (ParquetChatDataset, RowGroupReader, parquet_records,
                                     placeholder_picture)
from minimind_v.data.shapes import (ANSWER_TYPES, TWO_PICTURES, ShapesWorldConfig, answer_two_pictures,
                                    generate_world, random_scene, record_scenes, two_picture_question)
from minimind_v.tokenizer import EOS_TOKEN, IGNORE_INDEX, IMAGE_TAG, encode_chat, image_placeholder, render_chat

N = TINY_CLIP_TOKENS
SPLITS = (("pretrain_data.json", "pretrain_images", "pretrain_i2t.parquet"),
          ("sft_data.json", "sft_images", "sft_i2t.parquet"))


def jpeg(colour, size=(256, 256)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def write(path, rows, several=False):
    """A parquet file in the original's layout: exactly the two columns."""
    image_type = pa.list_(pa.binary()) if several else pa.binary()
    schema = pa.schema([("conversations", pa.string()), ("image_bytes", image_type)])
    table = pa.table({"conversations": [r[0] if isinstance(r[0], str) else json.dumps(r[0]) for r in rows],
                      "image_bytes": [r[1] for r in rows]}, schema=schema)
    pq.write_table(table, path, row_group_size=2)
    return path


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "You are a careful observer."}
RED, BLUE = jpeg((220, 40, 40)), jpeg((40, 80, 230), (300, 200))
SINGLE_ROWS = [
    ([user("What colour is the picture?<image>"), assistant("red")], RED),
    ([SYSTEM, user("<image>\nDescribe it."), assistant("A red square."), user("Again?"), assistant("red")], RED),
    ([user("Say hello."), assistant("hello")], placeholder_picture()),  # text only, the 8x8 placeholder
]
MULTI_ROWS = [
    ([user("<image>\n<image>\nWhich picture is blue?"), assistant("the second")], [RED, BLUE]),
    ([user("<image>\nWhat colour?"), assistant("blue")], [BLUE]),
    ([user("How are you?"), assistant("fine")], []),  # text only, no picture at all
]


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """A folder of two shards in the original's layout: one picture per row, and a list per row."""
    folder = tmp_path_factory.mktemp("original") / "shards"
    folder.mkdir()
    write(folder / "a_single.parquet", SINGLE_ROWS)
    write(folder / "b_multi.parquet", MULTI_ROWS, several=True)
    return folder


@pytest.fixture(scope="module")
def parquet_world(tmp_path_factory):
    """The tiny world of conftest, written in the parquet layout (same seed and sizes)."""
    out = tmp_path_factory.mktemp("pworld") / "world"
    generate_world(out, ShapesWorldConfig(seed=0, n_pretrain=40, n_sft=40, n_eval=16, n_eval_images=2,
                                          image_size=96, workers=1), progress=False, format="parquet")
    return out


def expected_pixels(encoder, pictures):
    return encoder.preprocess([decode_picture(p, "test") for p in pictures])


# ----------------------------------------------------------------------------- reading the original's rows


def test_original_rows_become_samples(original, world_tokenizer, tiny_encoder):
    tok = world_tokenizer
    ds = open_chat_dataset(original, tok, N, preprocess=tiny_encoder.preprocess)
    assert isinstance(ds, ParquetChatDataset) and len(ds) == 6
    placeholder_text, _ = image_placeholder(tok, N)
    rows = SINGLE_ROWS + MULTI_ROWS
    ids = ["a_single.parquet#0", "a_single.parquet#1", "a_single.parquet#2",
           "b_multi.parquet#0", "b_multi.parquet#1", "b_multi.parquet#2"]
    for i, (turns, pictures) in enumerate(rows):
        sample = ds[i]
        assert sample.id == ids[i]
        learned = sample.labels != IGNORE_INDEX
        assert torch.equal(sample.labels[learned], sample.input_ids[learned])
        answers = [t["content"] for t in turns if t["role"] == "assistant"]
        assert tok.decode(sample.input_ids[learned]) == "".join(a + EOS_TOKEN for a in answers)
        assert tok.decode(sample.input_ids) == render_chat(turns).replace(IMAGE_TAG, placeholder_text)
        shown = pictures if isinstance(pictures, list) else [pictures]
        # the very ids of the tokenizer's own chat encoding (system turn, several pictures)
        tagged = sum(t["content"].count(IMAGE_TAG) for t in turns)
        assert encode_chat(tok, turns, N, num_images=tagged) == (sample.input_ids.tolist(), sample.labels.tolist())
        if i in (2, 5):  # the text-only rows: no picture, the placeholder is never looked at
            assert sample.image is None
        else:
            assert sample.image.shape == (len(shown), 3, 64, 64)
            assert torch.equal(sample.image, expected_pixels(tiny_encoder, shown))
    system = ds[1]
    assert tok.decode(system.input_ids).startswith("<s>system\nYou are a careful observer.</s>\n<s>user\n")
    batch = collate([ds[i] for i in range(6)], pad_id=0)
    assert batch.image_counts.tolist() == [1, 1, 0, 2, 1, 0] and batch.images.shape == (5, 3, 64, 64)
    # pictures stacked sample by sample, in tag order
    assert torch.equal(batch.images[2:4], expected_pixels(tiny_encoder, [RED, BLUE]))


def test_start_up_reads_no_row_and_the_dataset_travels_to_workers(original, world_tokenizer, tiny_encoder,
                                                                   monkeypatch):
    reads = []
    real = RowGroupReader.group
    monkeypatch.setattr(RowGroupReader, "group", lambda self, *a, **k: reads.append(a) or real(self, *a, **k))
    ds = ParquetChatDataset(original, world_tokenizer, N, preprocess=tiny_encoder.preprocess)
    assert len(ds) == 6 and reads == []  # the footers only
    copy = pickle.loads(pickle.dumps(ds))  # what a spawned DataLoader worker gets
    assert torch.equal(copy[3].input_ids, ds[3].input_ids) and torch.equal(copy[3].image, ds[3].image)
    subset = ParquetChatDataset(original, world_tokenizer, N, preprocess=tiny_encoder.preprocess, rows=[4, 0])
    assert [s.id for s in subset] == ["b_multi.parquet#1", "a_single.parquet#0"]


def test_a_few_training_steps_and_an_evaluation(original, parquet_world, world_tokenizer, tiny_encoder,
                                                make_tiny_vlm):
    from minimind_v.evaluate import evaluate_vqa
    from minimind_v.inference import LoadedVLM

    ds = ParquetChatDataset(original, world_tokenizer, N, preprocess=tiny_encoder.preprocess)
    model = make_tiny_vlm(seed=1).attach_vision_encoder(tiny_encoder)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = collate([ds[i] for i in range(6)])  # one and two pictures, and none, in one batch
    losses = []
    for _ in range(6):
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels,
                    pixel_values=batch.images, use_cache=False)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert model.vision_proj.layers[0].weight.grad.abs().sum() > 0  # the pictures reached the loss

    bundle = LoadedVLM.from_parts(model.eval(), world_tokenizer, tiny_encoder)
    result = evaluate_vqa(bundle, parquet_world, progress=False, max_new_tokens=2)
    assert result["n"] == 16 and set(result["per_type"]) == set(ANSWER_TYPES)
    single = original / "a_single.parquet"  # no answer types; the text-only row is refused and counted
    result = evaluate_vqa(bundle, single, progress=False, max_new_tokens=2, skip_bad_samples=True)
    assert result["n"] == 2 and result["skipped_by_kind"] == {R.NO_IMAGE_NAME: 1}


# ----------------------------------------------------------------------------- bad rows


def test_bad_rows_are_named_or_counted(tmp_path, world_tokenizer, tiny_encoder):
    good = ([user("<image>\nColour?"), assistant("red")], RED)
    path = write(tmp_path / "bad.parquet", [
        good,
        ([user("<image> and <image>: colour?"), assistant("red")], RED),  # 2 tags, 1 picture
        ([user("<image>\nColour?"), assistant("red")], RED[: len(RED) // 3]),  # a truncated JPEG
        ('[{"role": "user", "content": "<image>', RED),  # not JSON
        ([user("No tag here."), assistant("red")], RED),  # a real picture without a tag
        good,
    ])
    ds = ParquetChatDataset(path, world_tokenizer, N, preprocess=tiny_encoder.preprocess)
    problems = {1: (r"2 '<image>' tags, expected exactly 1", R.IMAGE_TAGS),
                2: (r"picture 0 of 1: cannot decode the picture.*truncated or corrupt", R.UNREADABLE_IMAGE),
                3: (r"conversations are not valid JSON", R.BAD_CONVERSATIONS),
                4: (r"no <image> tag but 1 picture", R.IMAGE_TAGS)}
    for row, (message, kind) in problems.items():
        with pytest.raises(DataError, match=rf"row {row} of .*bad.parquet: {message}") as caught:
            ds[row]
        assert caught.value.kind == kind and caught.value.record == f"bad.parquet#{row}"
    skipping = ParquetChatDataset(path, world_tokenizer, N, preprocess=tiny_encoder.preprocess,
                                  skip_bad_samples=True)
    batch = collate([skipping[i] for i in range(len(skipping))])
    assert batch.ids == ["bad.parquet#0", "bad.parquet#5"] and batch.images.shape[0] == 2
    assert [(d.id, d.kind) for d in batch.dropped] == [(f"bad.parquet#{r}", k) for r, (_, k) in problems.items()]
    assert len(skipping.skipped) == 4 and "4 bad sample(s)" in skipping.skip_summary()


def test_a_long_sample_is_cut_before_a_picture_that_does_not_fit(tmp_path, world_tokenizer, tiny_encoder):
    turns = [user("<image>\nFirst?"), assistant("red"), user("<image>\nAnd this one?"), assistant("blue")]
    path = write(tmp_path / "long.parquet", [(turns, [RED, BLUE])], several=True)
    full = ParquetChatDataset(path, world_tokenizer, N, preprocess=tiny_encoder.preprocess)[0]
    assert full.image.shape[0] == 2
    placeholder = image_placeholder(world_tokenizer, N)[1][0]
    starts = [i for i in range(len(full.input_ids)) if full.input_ids[i] == placeholder
              and (i == 0 or full.input_ids[i - 1] != placeholder)]
    cut = ParquetChatDataset(path, world_tokenizer, N, preprocess=tiny_encoder.preprocess,
                             max_length=starts[1] + N // 2)[0]  # through the second picture's placeholders
    assert cut.image.shape[0] == 1 and len(cut.input_ids) == starts[1]
    assert torch.equal(cut.input_ids, full.input_ids[: starts[1]])


# ----------------------------------------------------------------------------- the shapes world, both layouts


@pytest.mark.parametrize("json_name, images, parquet_name", SPLITS)
def test_json_and_parquet_worlds_give_the_same_samples(tiny_world, parquet_world, world_tokenizer, tiny_encoder,
                                                       json_name, images, parquet_name):
    path, folder = resolve_data(tiny_world, json_name, images)
    as_json = open_chat_dataset(path, world_tokenizer, N, image_dir=folder, preprocess=tiny_encoder.preprocess)
    path, folder = resolve_data(parquet_world, json_name, images)
    assert folder is None and path.name == parquet_name
    as_parquet = open_chat_dataset(path, world_tokenizer, N, preprocess=tiny_encoder.preprocess)
    assert isinstance(as_json, ChatDataset) and len(as_json) == len(as_parquet) == 40
    records = json.loads((tiny_world / json_name).read_text())
    for record, a, b in zip(records, as_json, as_parquet):
        assert a.id == b.id == record["id"]
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
        assert torch.equal(a.image, b.image)  # the same PNG bytes
        # and the very ids the tokenizer's own chat encoding gives (one picture per record)
        assert encode_chat(world_tokenizer, record["conversations"], N)[:2] == (a.input_ids.tolist(), a.labels.tolist())
    text = [ChatDataset(tiny_world / json_name, world_tokenizer, text_only=True)[i] for i in range(5)]
    text_parquet = ParquetChatDataset(path, world_tokenizer, text_only=True)
    for a, b in zip(text, text_parquet):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels) and b.image is None
    records = parquet_records(path)
    assert [r["id"] for r in records] == [item[0] for item in as_json.items]
    assert "scene" in records[0] and isinstance(records[0]["scene"], list)


def test_feature_cache_holds_parquet_pictures(parquet_world, world_tokenizer, tiny_encoder, tmp_path):
    from minimind_v.data.features import FeatureCache, ensure_cache

    path = parquet_world / "sft_i2t.parquet"
    pixels = ParquetChatDataset(path, world_tokenizer, N, preprocess=tiny_encoder.preprocess)
    names = pixels.picture_names()
    assert names[:2] == ["sft_i2t.parquet#0/0", "sft_i2t.parquet#1/0"] and len(names) == 40
    cache = ensure_cache(tiny_encoder, parquet_world, tmp_path / "cache", names=names, progress=False)
    cached = ParquetChatDataset(path, world_tokenizer, N, feature_cache=cache)
    for i in (0, 7):
        assert cached[i].image.shape == (1, N, 32)
        torch.testing.assert_close(cached[i].image.float(), tiny_encoder(pixels[i].image), rtol=2e-3, atol=2e-3)
    FeatureCache.open(tmp_path / "cache", tiny_encoder, image_dir=parquet_world)  # fresh
    path.touch()  # the parquet file changed: every picture in it is stale
    with pytest.raises(Exception, match="stale"):
        FeatureCache.open(tmp_path / "cache", tiny_encoder, image_dir=parquet_world)


def test_two_picture_questions_in_both_layouts(tmp_path, world_tokenizer, tiny_encoder):
    config = ShapesWorldConfig(seed=1, n_pretrain=4, n_sft=30, n_eval=12, n_eval_images=1, image_size=96, workers=1,
                               question_types=ANSWER_TYPES + (TWO_PICTURES,))
    for layout in ("json", "parquet"):
        generate_world(tmp_path / layout, config, progress=False, format=layout)
    sft = json.loads((tmp_path / "json" / "sft_data.json").read_text())
    evals = json.loads((tmp_path / "json" / "eval_data.json").read_text())
    two = [r for r in sft + evals if isinstance(r["image"], list)]
    assert len(two) >= 5 and sum(r.get("answer_type") == TWO_PICTURES for r in evals) == 2
    answers = set()
    for r in two:  # every answer re-derived from the two scenes
        conv = r["conversations"]
        assert conv[0]["value"].startswith("<image>\n<image>\n")
        for q, a in zip(conv[::2], conv[1::2]):
            assert answer_two_pictures(record_scenes(r), q["value"]) == a["value"]
            answers.add(a["value"])
    assert answers <= {"the first", "the second", "neither", "yes", "no"} and len(answers) >= 3
    rng = random.Random(0)  # over many scene pairs, every answer comes, none dominates
    drawn = Counter(two_picture_question([random_scene(rng), random_scene(rng)], rng)[1] for _ in range(400))
    assert set(drawn) == {"the first", "the second", "neither", "yes", "no"} and max(drawn.values()) < 0.4 * 400
    as_json = ChatDataset(tmp_path / "json" / "sft_data.json", world_tokenizer, N,
                          image_dir=tmp_path / "json" / "sft_images", preprocess=tiny_encoder.preprocess)
    as_parquet = ParquetChatDataset(tmp_path / "parquet" / "sft_i2t.parquet", world_tokenizer, N,
                                    preprocess=tiny_encoder.preprocess)
    index = next(i for i, r in enumerate(sft) if isinstance(r["image"], list))
    a, b = as_json[index], as_parquet[index]
    assert a.image.shape == b.image.shape == (2, 3, 64, 64)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels) and torch.equal(a.image, b.image)
    # the default world has no two-picture record
    assert TWO_PICTURES not in ShapesWorldConfig().question_types


def test_world_texts_reads_the_parquet_layout(tiny_world, parquet_world):
    """The tokenizer's training text is the same whichever layout the world was written in (the
    JSON world's turns are the truth), read from the parquet files through the parquet reader."""
    from minimind_v.recipe import world_texts

    assert not (parquet_world / "sft_data.json").exists()  # no JSON to fall back on
    from_json, from_parquet = world_texts(tiny_world), world_texts(parquet_world)
    records = [r for name in ("pretrain_data.json", "sft_data.json")
               for r in json.loads((tiny_world / name).read_text(encoding="utf-8"))]
    assert len(from_json) == sum(len(r["conversations"]) for r in records)
    assert from_parquet == from_json
    assert from_parquet[0].startswith("user\n") and from_parquet[1].startswith("assistant\n")
    assert not any(IMAGE_TAG in text for text in from_parquet)


def test_object_repeats_needs_records_that_describe_their_scenes(parquet_world, world_tokenizer, tiny_encoder):
    from minimind_v.train.vlm import build_dataset, build_parser

    ns = build_parser("sft").parse_args(["--data", str(parquet_world), "--init", "i", "--out", "o",
                                         "--object-repeats", "1,2,3"])
    with pytest.raises(DataError, match=r"--object-repeats: .*\.parquet holds parquet rows, which describe no scenes"):
        build_dataset(ns, Path("o"), world_tokenizer, tiny_encoder, None)
    ns = build_parser("sft").parse_args(["--data", str(parquet_world), "--init", "i", "--out", "o",
                                         "--object-curriculum"])
    with pytest.raises(DataError, match=r"--object-curriculum: .*\.parquet holds parquet rows, which describe no"):
        build_dataset(ns, Path("o"), world_tokenizer, tiny_encoder, None)
