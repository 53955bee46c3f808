"""Training samples: the loss falls on the answers and nothing else; bad records fail by name.

The truth for the loss masks is the record itself: decoding the labelled tokens must give back
exactly its answers, each closed by </s>.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import TINY_CLIP_TOKENS
from minimind_v.data.datasets import Batch, ChatDataset, DataError, collate, read_records
from minimind_v.data.records import find_image
from minimind_v.tokenizer import (EOS_TOKEN, IGNORE_INDEX, IMAGE_TAG, IMAGE_TOKEN, encode_chat, image_placeholder,
                                  render_chat)

N = TINY_CLIP_TOKENS


def answers(record) -> list[str]:
    return [t["value"] for t in record["conversations"][1::2]]


def image_dataset(world, tokenizer, encoder, json_name="sft_data.json", images="sft_images", **kw):
    return ChatDataset(world / json_name, tokenizer, N, image_dir=world / images,
                       preprocess=encoder.preprocess, **kw)


@pytest.mark.parametrize("json_name, images", [("sft_data.json", "sft_images"),
                                               ("pretrain_data.json", "pretrain_images")])
def test_labels_are_exactly_the_answers(tiny_world, world_tokenizer, tiny_encoder, json_name, images):
    tok = world_tokenizer
    records = read_records(tiny_world / json_name)
    ds = image_dataset(tiny_world, tok, tiny_encoder, json_name, images)
    assert len(ds) == len(records)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    placeholder_text, _ = image_placeholder(tok, N)
    multi_turn = 0
    for i, record in enumerate(records):
        sample = ds[i]
        ids, labels = sample.input_ids, sample.labels
        assert sample.id == record["id"] and ids.shape == labels.shape
        learned = labels != IGNORE_INDEX
        assert torch.equal(labels[learned], ids[learned])  # a label is the token itself, unshifted
        # Every answer (with its </s>), in order, and nothing of the prompts.
        assert tok.decode(ids[learned]) == "".join(a + EOS_TOKEN for a in answers(record))
        # The whole sample is the chat with the image tag expanded to N placeholder tokens.
        chat = [{"role": "user" if k % 2 == 0 else "assistant", "content": t["value"]}
                for k, t in enumerate(record["conversations"])]
        assert tok.decode(ids) == render_chat(chat).replace(IMAGE_TAG, placeholder_text)
        where = (ids == image_id).nonzero().flatten()
        assert len(where) == N and where[-1] - where[0] == N - 1  # one contiguous run
        assert not learned[where].any()
        assert sample.image.shape == (1, 3, 64, 64)  # (pictures of the sample, 3, S, S)
        multi_turn += len(answers(record)) > 1
    if json_name == "sft_data.json":
        assert multi_turn > 5  # the multi-turn case is really exercised


def test_collate_pads_to_the_longest_sample(tiny_world, world_tokenizer, tiny_encoder):
    ds = image_dataset(tiny_world, world_tokenizer, tiny_encoder, max_length=1024)
    samples = [ds[i] for i in range(6)]
    lengths = [len(s.input_ids) for s in samples]
    assert len(set(lengths)) > 1
    batch = collate(samples, pad_id=0)
    assert isinstance(batch, Batch) and batch.ids == [s.id for s in samples]
    assert batch.input_ids.shape == batch.labels.shape == batch.attention_mask.shape == (6, max(lengths))
    for row, s in enumerate(samples):
        n = lengths[row]
        assert torch.equal(batch.input_ids[row, :n], s.input_ids)
        assert torch.equal(batch.labels[row, :n], s.labels)
        assert torch.all(batch.input_ids[row, n:] == 0)
        assert torch.all(batch.labels[row, n:] == IGNORE_INDEX)
        assert batch.attention_mask[row].tolist() == [1] * n + [0] * (max(lengths) - n)
    assert torch.equal(batch.images, torch.cat([s.image for s in samples]))
    assert batch.image_counts.tolist() == [1] * 6
    assert batch.n_targets == sum(int((s.labels[1:] != IGNORE_INDEX).sum()) for s in samples)
    # A batch of the two shortest is as wide as the longer of them, not a fixed length.
    short = sorted(samples, key=lambda s: len(s.input_ids))[:2]
    assert collate(short).input_ids.shape[1] == len(short[1].input_ids)


def test_text_only_trains_every_token_without_the_picture(tiny_world, world_tokenizer):
    tok = world_tokenizer
    records = read_records(tiny_world / "sft_data.json")
    ds = ChatDataset(tiny_world / "sft_data.json", tok, num_image_tokens=N, text_only=True)
    assert ds.num_image_tokens == 0
    for i, record in enumerate(records[:10]):
        sample = ds[i]
        assert sample.image is None
        assert torch.equal(sample.labels, sample.input_ids)
        chat = [{"role": "user" if k % 2 == 0 else "assistant",
                 "content": t["value"].replace(IMAGE_TAG, "").strip()}
                for k, t in enumerate(record["conversations"])]
        assert tok.decode(sample.input_ids) == render_chat(chat)
        assert IMAGE_TAG not in tok.decode(sample.input_ids)
    assert collate([ds[0], ds[1]]).images is None


def test_long_samples_are_cut_after_the_prompt_never_inside_it(tiny_world, world_tokenizer, tiny_encoder):
    tok = world_tokenizer
    full = image_dataset(tiny_world, tok, tiny_encoder)
    index = max(range(len(full)), key=lambda i: len(full[i].input_ids))
    rid, ids, labels = full[index].id, full[index].input_ids.tolist(), full[index].labels.tolist()
    first_answer = next(i for i, l in enumerate(labels) if l != IGNORE_INDEX)
    record = read_records(tiny_world / "sft_data.json")[index]

    cut = image_dataset(tiny_world, tok, tiny_encoder, max_length=first_answer + 3, records=[record])
    assert cut[0].input_ids.tolist() == ids[: first_answer + 3]
    assert cut[0].labels.tolist() == labels[: first_answer + 3]

    with pytest.raises(DataError, match=rf"record '{rid}'.*prompt alone is {first_answer} tokens.*max_length=20"):
        image_dataset(tiny_world, tok, tiny_encoder, max_length=20, records=[record])[0]


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def bad_world(tiny_world, tmp_path) -> Path:
    """A copy of 6 SFT records and their images (under the record's plain name, which the loader
    finds as well as the original's COCO_train2014_ naming), ready to be broken."""
    out = tmp_path / "bad"
    (out / "sft_images").mkdir(parents=True)
    records = read_records(tiny_world / "sft_data.json")[:6]
    for r in records:
        shutil.copy(find_image(tiny_world / "sft_images", r["image"]), out / "sft_images" / r["image"])
    (out / "sft_data.json").write_text(json.dumps(records), encoding="utf-8")
    return out


def write_records(folder: Path, records) -> Path:
    path = folder / "sft_data.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def test_corrupt_and_non_image_files_name_the_record_and_file(bad_world, world_tokenizer, tiny_encoder):
    records = read_records(bad_world / "sft_data.json")
    truncated = bad_world / "sft_images" / records[1]["image"]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    not_image = bad_world / "sft_images" / records[3]["image"]
    not_image.write_text("this is a text file, not a picture")

    ds = image_dataset(bad_world, world_tokenizer, tiny_encoder)
    assert len(ds) == 6  # found when a sample is loaded, not before
    assert ds[0].image is not None and ds[2].image is not None
    with pytest.raises(DataError, match=rf"record '{records[1]['id']}'.*{truncated.name}.*truncated or corrupt"):
        ds[1]
    with pytest.raises(DataError, match=rf"record '{records[3]['id']}'.*{not_image.name}.*not an image file"):
        ds[3]

    skipping = image_dataset(bad_world, world_tokenizer, tiny_encoder, skip_bad_samples=True)
    assert len(skipping) == 6 and not skipping.skipped  # nothing is read before a sample is drawn
    batch = collate(list(skipping))
    assert batch.ids == [r["id"] for i, r in enumerate(records) if i not in (1, 3)]
    assert [s.id for s in batch.dropped] == [records[1]["id"], records[3]["id"]]
    assert len(skipping.skipped) == 2
    assert skipping.skipped[0].id == records[1]["id"] and truncated.name in skipping.skipped[0].message
    assert skipping.skipped[1].id == records[3]["id"] and not_image.name in skipping.skipped[1].message


def test_missing_image_file_names_the_record(bad_world, world_tokenizer, tiny_encoder):
    records = read_records(bad_world / "sft_data.json")
    (bad_world / "sft_images" / records[2]["image"]).unlink()
    ds = image_dataset(bad_world, world_tokenizer, tiny_encoder)
    with pytest.raises(DataError, match=rf"record '{records[2]['id']}'.*{records[2]['image']}.*no such image file"):
        ds[2]
    skipping = image_dataset(bad_world, world_tokenizer, tiny_encoder, skip_bad_samples=True)
    assert len(collate(list(skipping)).ids) == 5 and [s.id for s in skipping.skipped] == [records[2]["id"]]


BROKEN = {
    "no image tag": (lambda r: {**r, "conversations": [{**r["conversations"][0], "value": "What is it?"},
                                                        *r["conversations"][1:]]},
                     r"record '{id}' in .*sft_data.json.*no turn holds the <image> tag"),
    "no conversations": (lambda r: {k: v for k, v in r.items() if k != "conversations"},
                         r"record '{id}' in .*needs a 'conversations' list"),
    "conversations not a list": (lambda r: {**r, "conversations": "hello <image>"},
                                 r"record '{id}' in .*needs a 'conversations' list"),
    "question only": (lambda r: {**r, "conversations": r["conversations"][:1]},
                      r"record '{id}' in .*needs a 'conversations' list with a question and an answer"),
    "value not a string": (lambda r: {**r, "conversations": [r["conversations"][0], {"from": "gpt", "value": 3}]},
                           r"record '{id}' in .*every turn needs a string 'value'"),
    "turns out of order": (lambda r: {**r, "conversations": [{**t, "from": "gpt"} for t in r["conversations"][:2]]},
                           r"record '{id}' in .*sft_data.json: turn 0 is from 'gpt', expected 'human'"),
    "no image file name": (lambda r: {**r, "image": None}, r"record '{id}' in .*has no 'image' file name"),
    "two image tags": (lambda r: {**r, "conversations": [{**r["conversations"][0], "value": "<image> <image> what?"},
                                                          *r["conversations"][1:]]},
                       r"record '{id}'.*2 '<image>' tags, expected exactly 1"),
    "record not an object": (lambda r: ["not", "a", "record"], r"record '#2' in .* is a list, not an object"),
}


@pytest.mark.parametrize("breakage", BROKEN.values(), ids=BROKEN.keys())
def test_malformed_records_are_named_or_skipped(bad_world, world_tokenizer, tiny_encoder, breakage):
    change, message = breakage
    records = read_records(bad_world / "sft_data.json")
    records[2] = change(records[2])
    write_records(bad_world, records)
    rid = records[2]["id"] if isinstance(records[2], dict) else None
    strict = image_dataset(bad_world, world_tokenizer, tiny_encoder)
    assert strict[1].id == records[1]["id"]  # the others are usable: the record fails when it is read
    with pytest.raises(DataError, match=message.format(id=rid)):
        strict[2]
    skipping = image_dataset(bad_world, world_tokenizer, tiny_encoder, skip_bad_samples=True)
    batch = collate(list(skipping))
    assert len(batch.dropped) == 1 and len(skipping.skipped) == 1 and skipping.skipped[0].id == batch.dropped[0].id
    assert batch.ids == [r["id"] for i, r in enumerate(records) if i != 2]


def test_bad_json_files_are_clear_errors(bad_world, world_tokenizer, tiny_encoder):
    path = bad_world / "sft_data.json"
    path.write_text('[{"id": "a", "image": "x.png", "conversations": [', encoding="utf-8")
    with pytest.raises(DataError, match=r"sft_data.json is not valid JSON"):
        image_dataset(bad_world, world_tokenizer, tiny_encoder)
    path.write_text('{"id": "a"}', encoding="utf-8")
    with pytest.raises(DataError, match=r"sft_data.json must hold a JSON list of records, got dict"):
        image_dataset(bad_world, world_tokenizer, tiny_encoder, skip_bad_samples=True)
    path.write_text("[]", encoding="utf-8")
    with pytest.raises(DataError, match="holds no usable record"):
        image_dataset(bad_world, world_tokenizer, tiny_encoder)
    with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
        image_dataset(bad_world, world_tokenizer, tiny_encoder, json_name="missing.json")
    with pytest.raises(ValueError, match="needs image_dir and preprocess, or a feature_cache"):
        ChatDataset(bad_world / "sft_data.json", world_tokenizer, N)


def test_every_record_bad_is_counted_when_skipping(bad_world, world_tokenizer, tiny_encoder):
    records = read_records(bad_world / "sft_data.json")
    for r in records:
        (bad_world / "sft_images" / r["image"]).write_text("broken")
    skipping = image_dataset(bad_world, world_tokenizer, tiny_encoder, skip_bad_samples=True)
    batch = collate(list(skipping))
    assert batch.input_ids.shape[0] == 0 and batch.n_targets == 0
    assert [s.id for s in skipping.skipped] == [r["id"] for r in records]
    assert skipping.skip_summary().startswith(f"skipped {len(records)} bad sample(s) ({len(records)} unreadable image)")


def test_feature_cache_samples_are_the_encoders_patch_tokens(tiny_world, world_tokenizer, tiny_encoder, tmp_path):
    from minimind_v.data.features import ensure_cache

    cache = ensure_cache(tiny_encoder, tiny_world / "sft_images", tmp_path / "cache", progress=False)
    ds = ChatDataset(tiny_world / "sft_data.json", world_tokenizer, N, feature_cache=cache)
    pixels_ds = image_dataset(tiny_world, world_tokenizer, tiny_encoder)
    samples = [ds[i] for i in range(4)]
    for s, p in zip(samples, (pixels_ds[i] for i in range(4))):
        assert s.id == p.id and torch.equal(s.input_ids, p.input_ids) and torch.equal(s.labels, p.labels)
        assert s.image.shape == (1, N, 32)
        expected = tiny_encoder(p.image)
        torch.testing.assert_close(s.image.float(), expected, rtol=2e-3, atol=2e-3)  # float16 cache
    assert collate(samples).images.shape == (4, N, 32)
    # a record whose image the cache does not hold is named
    record = {**read_records(tiny_world / "sft_data.json")[0], "id": "stranger", "image": "elsewhere.png"}
    with pytest.raises(DataError, match=r"record 'stranger' in .*: image 'elsewhere.png' is not in the feature cache"):
        ChatDataset(tiny_world / "sft_data.json", world_tokenizer, N, feature_cache=cache, records=[record])[0]
    skipping = ChatDataset(tiny_world / "sft_data.json", world_tokenizer, N, feature_cache=cache,
                           records=[record, read_records(tiny_world / "sft_data.json")[1]], skip_bad_samples=True)
    assert collate(list(skipping)).ids == [read_records(tiny_world / "sft_data.json")[1]["id"]]
    assert [(s.id, s.kind) for s in skipping.skipped] == [("stranger", "image not in the feature cache")]


class CountingTokenizer:
    """A tokenizer that counts its encode calls (everything else goes to the real one)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_start_up_tokenises_nothing_and_samples_are_the_chat_templates_ids(tiny_world, world_tokenizer,
                                                                          tiny_encoder):
    """The records are tokenised when drawn, never at start-up, with the same ids and labels as the
    chat template gives each record on its own (encode_chat: the independent truth)."""
    records = read_records(tiny_world / "sft_data.json")
    counting = CountingTokenizer(world_tokenizer)
    ds = image_dataset(tiny_world, counting, tiny_encoder)
    assert len(ds) == len(records) and counting.calls == 0
    for i in (0, len(records) // 2, len(records) - 1):
        sample = ds[i]
        expected_ids, expected_labels = encode_chat(world_tokenizer, records[i]["conversations"], N)[:2]
        assert sample.id == records[i]["id"]
        assert (sample.input_ids.tolist(), sample.labels.tolist()) == (expected_ids, expected_labels)
    assert counting.calls > 0
