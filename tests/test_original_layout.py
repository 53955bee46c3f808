"""The original project's own rules: v1's file naming, v1's picture preprocessing, and the CLIP
folders transformers writes.

- v1's SFT loader opens ``sft_images/COCO_train2014_<image>``: the shapes world writes that name,
  and a reader written here to v1's rule opens every record; our loader finds either name.
- v1 resizes the whole picture to 224x224 (``image.resize((224, 224))``) where CLIP centre-crops:
  an encoder's preprocessing mode says which, is saved with its folder, and "resize" equals a
  whole-picture resize computed here independently.
- transformers 5's ``CLIPProcessor.save_pretrained`` writes only processor_config.json: such a
  folder opens, and gives the same encoder as a preprocessor_config.json folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_CLIP_TOKENS
from minimind_v.data import records as R
from minimind_v.data.datasets import ChatDataset, DataError
from minimind_v.data.features import StaleCacheError, ensure_cache, FeatureCache
from minimind_v.model.vision import PREPROCESSING_FILE, VisionEncoder, VisionModelNotFoundError
from minimind_v.testing import make_random_clip

N = TINY_CLIP_TOKENS
V1_PLACEHOLDER = "<" * 25 + ">" * 25


def v1_samples(dataset_dir: Path, split: str):
    """v1's model/dataset.py (commit 6982ced), the parts that touch files: PretrainDataset opens
    dataset_path + sample['image'] with dataset_path './dataset/pretrain_images/'; SFTDataset opens
    './dataset/sft_images/' + 'COCO_train2014_' + sample['image']. Both read the conversation's
    'value' fields in (question, answer) pairs and put the placeholder where '<image>' is."""
    with open(dataset_dir / f"{split}_data.json", "r", encoding="utf-8") as f:
        data = json.load(f)
    dataset_path = f"{dataset_dir}/{split}_images/"
    for sample in data:
        image_name = ("COCO_train2014_" + sample["image"]) if split == "sft" else sample["image"]
        conversation = sample["conversations"]
        q = conversation[0]["value"].replace("<image>", V1_PLACEHOLDER)
        a = conversation[1]["value"]
        image = Image.open(f"{dataset_path}{image_name}")
        yield q, a, image.resize((224, 224))


@pytest.mark.parametrize("split", ["pretrain", "sft"])
def test_v1_reads_every_shapes_world_record(tiny_world, split):
    records = json.loads((tiny_world / f"{split}_data.json").read_text())
    read = list(v1_samples(tiny_world, split))
    assert len(read) == len(records) == 40
    assert all(V1_PLACEHOLDER in q and a and image.size == (224, 224) for q, a, image in read)


def test_pictures_are_found_under_either_name_and_never_outside(tiny_world, world_tokenizer, tiny_encoder,
                                                                tmp_path):
    records = json.loads((tiny_world / "sft_data.json").read_text())[:3]
    folder = tmp_path / "sft_images"
    folder.mkdir()
    shutil.copy(tiny_world / "sft_images" / ("COCO_train2014_" + records[0]["image"]), folder / records[0]["image"])
    shutil.copy(tiny_world / "sft_images" / ("COCO_train2014_" + records[1]["image"]),
                folder / ("COCO_train2014_" + records[1]["image"]))
    victim = tmp_path / "victim.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(victim)
    (folder / ("COCO_train2014_" + records[2]["image"])).symlink_to(victim)  # the original naming, leading out
    (tmp_path / "sft.json").write_text(json.dumps(records))
    ds = ChatDataset(tmp_path / "sft.json", world_tokenizer, N, image_dir=folder, preprocess=tiny_encoder.preprocess)
    assert ds[0].image.shape == ds[1].image.shape == (1, 3, 64, 64)
    with pytest.raises(DataError, match=rf"record '{records[2]['id']}'.*leads outside") as caught:
        ds[2]
    assert caught.value.kind == R.IMAGE_OUTSIDE
    assert R.stored_image_name(folder, records[1]["image"]) == "COCO_train2014_" + records[1]["image"]
    # the feature cache holds the files as stored; records find theirs under either name
    cache = ensure_cache(tiny_encoder, tiny_world / "sft_images", tmp_path / "cache", progress=False)
    cached = ChatDataset(tiny_world / "sft_data.json", world_tokenizer, N, feature_cache=cache)
    assert cached[0].image.shape == (1, N, 32)


# ----------------------------------------------------------------------------- preprocessing modes


def test_resize_mode_is_a_whole_picture_resize(tiny_clip_dir, tmp_path):
    encoder = VisionEncoder.from_pretrained(tiny_clip_dir, preprocessing="resize")
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 100, 3), dtype=np.uint8))
    # Independently: the whole picture to S x S (bicubic, PIL's default in v1), then CLIP's mean and std.
    settings = json.loads((tiny_clip_dir / "preprocessor_config.json").read_text())
    size = encoder.image_size
    pixels = np.asarray(picture.resize((size, size), Image.BICUBIC), dtype=np.float64) / 255.0
    expected = (pixels - np.array(settings["image_mean"])) / np.array(settings["image_std"])
    got = encoder.preprocess(picture)[0].permute(1, 2, 0).double().numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    centre = VisionEncoder.from_pretrained(tiny_clip_dir)  # the book's default: centre crop
    assert centre.preprocessing == "center_crop"
    assert not torch.allclose(centre.preprocess(picture), encoder.preprocess(picture))
    square = Image.fromarray(np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8))
    torch.testing.assert_close(centre.preprocess(square), encoder.preprocess(square))  # the same for S x S
    assert centre.fingerprint() != encoder.fingerprint()

    # Saved with the folder and read back; an explicit mode wins.
    saved = encoder.save_pretrained(tmp_path / "v1_clip")
    assert json.loads((saved / PREPROCESSING_FILE).read_text()) == {"mode": "resize"}
    assert VisionEncoder.from_pretrained(saved).preprocessing == "resize"
    assert VisionEncoder.from_pretrained(saved, preprocessing="center_crop").preprocessing == "center_crop"
    with pytest.raises(ValueError, match="preprocessing mode must be one of"):
        VisionEncoder.from_pretrained(saved, preprocessing="squash")
    # Tokens cached through one mode are never served to the other.
    images = tmp_path / "images"
    images.mkdir()
    picture.save(images / "wide.png")
    ensure_cache(centre, images, tmp_path / "cache", progress=False)
    with pytest.raises(StaleCacheError):
        FeatureCache.open(tmp_path / "cache", encoder)
    resized = ensure_cache(encoder, images, tmp_path / "cache", progress=False)
    torch.testing.assert_close(resized["wide.png"].float(), encoder(encoder.preprocess(picture))[0],
                               rtol=2e-3, atol=2e-3)


# ----------------------------------------------------------------------------- CLIP folders transformers writes


def processor_saved_folder(clip_dir: Path, out: Path) -> Path:
    """clip_dir's weights with its image processor saved the transformers 5 way: CLIPProcessor.save_pretrained,
    which writes processor_config.json (the image processor's settings inside) and no preprocessor_config.json."""
    from transformers import CLIPProcessor, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    shutil.copytree(clip_dir, out)
    image_processor = CLIPImageProcessorPil.from_pretrained(clip_dir)
    (out / "preprocessor_config.json").unlink()
    vocab = out / "_vocab.json"
    vocab.write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "a": 3}))
    (out / "_merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(vocab), str(out / "_merges.txt"))
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out


def test_a_processor_config_only_folder_opens(tiny_clip_dir, tiny_encoder, tmp_path):
    folder = processor_saved_folder(tiny_clip_dir, tmp_path / "processor_only")
    assert (folder / "processor_config.json").is_file() and not (folder / "preprocessor_config.json").exists()
    encoder = VisionEncoder.from_pretrained(folder)
    assert encoder.fingerprint() == tiny_encoder.fingerprint()  # the same weights, the same preprocessing
    picture = Image.new("RGB", (90, 50), (10, 200, 30))
    torch.testing.assert_close(encoder.preprocess(picture), tiny_encoder.preprocess(picture))
    # both files: transformers reads processor_config.json's entry first; so do we
    shutil.copy(tiny_clip_dir / "preprocessor_config.json", folder / "preprocessor_config.json")
    assert VisionEncoder.from_pretrained(folder).fingerprint() == tiny_encoder.fingerprint()
    # neither: refused, naming both
    (folder / "preprocessor_config.json").unlink()
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": "CLIPProcessor"}))
    with pytest.raises(VisionModelNotFoundError, match="preprocessor_config.json.*processor_config.json"):
        VisionEncoder.from_pretrained(folder)


def test_random_clip_folder_records_nothing_and_means_centre_crop(tmp_path):
    folder = make_random_clip(tmp_path / "c", image_size=64, patch_size=32, width=32, layers=1, heads=2)
    assert not (folder / PREPROCESSING_FILE).exists()
    assert VisionEncoder.from_pretrained(folder).preprocessing == "center_crop"
