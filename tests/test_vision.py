"""The CLIP vision encoder wrapper and image loading, checked against transformers computed directly."""

import json
import warnings
import shutil

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPVisionModel

from minimind_v.data.images import ImageError, list_image_files, load_image, to_rgb
from minimind_v.model.vision import VisionEncoder, VisionModelNotFoundError
from minimind_v.testing import make_random_clip


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return make_random_clip(tmp_path_factory.mktemp("clip") / "b32", image_size=224, patch_size=32, width=64)


@pytest.fixture(scope="module")
def encoder(clip_folder):
    return VisionEncoder.from_pretrained(clip_folder)


def random_images(count, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(97, 131), (240, 180), (50, 400), (224, 224), (301, 77)]
    return [
        Image.fromarray(rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8)) for i in range(count)
    ]


# ---------------------------------------------------------------- tokens and shapes


def test_tokens_equal_clip_last_hidden_state(encoder, clip_folder):
    images = random_images(5)
    pixel_values = encoder.preprocess(images)
    reference_model = CLIPVisionModel.from_pretrained(clip_folder).eval()
    with torch.no_grad():
        reference = reference_model(pixel_values=pixel_values).last_hidden_state
        # The post-layernorm is NOT applied to the tokens (CLIP uses it for the pooled CLS only).
        post_normed = reference_model.post_layernorm(reference)
    tokens = encoder(pixel_values)
    assert tokens.shape == (5, 50, 64)
    torch.testing.assert_close(tokens, reference, rtol=0, atol=0)
    assert not torch.allclose(tokens, post_normed, atol=1e-3)
    # encode_images batches internally; every batch size gives the same tokens
    torch.testing.assert_close(encoder.encode_images(images, batch_size=2), reference, rtol=1e-5, atol=1e-5)


def test_loads_vision_tower_from_full_clip_folder(tmp_path):
    folder = make_random_clip(tmp_path / "full", image_size=64, patch_size=16, width=32, full=True, seed=3)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "clip"  # a whole CLIPModel, text tower included
    encoder = VisionEncoder.from_pretrained(folder)
    pixel_values = encoder.preprocess(random_images(3))
    with torch.no_grad():
        reference = CLIPVisionModel.from_pretrained(folder)(pixel_values=pixel_values).last_hidden_state
    torch.testing.assert_close(encoder(pixel_values), reference, rtol=0, atol=0)


@pytest.mark.parametrize("image_size, patch_size", [(64, 16), (224, 32), (96, 32)])
def test_geometry(tmp_path, image_size, patch_size):
    folder = make_random_clip(tmp_path / "clip", image_size=image_size, patch_size=patch_size, width=32)
    encoder = VisionEncoder.from_pretrained(folder)
    grid = image_size // patch_size
    assert (encoder.grid, encoder.num_tokens, encoder.width) == (grid, 1 + grid * grid, 32)
    pixel_values = encoder.preprocess(random_images(3))
    assert pixel_values.shape == (3, 3, image_size, image_size)
    assert encoder(pixel_values).shape == (3, 1 + grid * grid, 32)


def test_preprocess_matches_clip_recipe(encoder):
    """Resize the short side to 224 (bicubic), centre-crop, scale to [0,1], normalise with CLIP's mean/std."""
    image = random_images(1)[0]  # 131 wide x 97 high
    width, height = image.size
    new_w, new_h = int(224 * width / height), 224  # short side -> 224, long side truncated
    resized = np.asarray(image.resize((new_w, new_h), Image.BICUBIC), dtype=np.float64) / 255.0
    left = (new_w - 224) // 2
    cropped = resized[:, left : left + 224]
    mean = np.array([0.48145466, 0.4578275, 0.40821073])
    std = np.array([0.26862954, 0.26130258, 0.27577711])
    expected = torch.from_numpy(((cropped - mean) / std).transpose(2, 0, 1)).float()
    torch.testing.assert_close(encoder.preprocess([image])[0], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["center_crop", "resize"])
def test_pictures_already_at_size_are_looked_up_bit_for_bit(encoder, mode):
    """224 x 224 pictures skip the processor (a byte table instead): the same bits as its own steps."""
    from minimind_v.model.image_processing import Preprocessor

    rng = np.random.default_rng(5)
    pictures = [Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for _ in range(3)]
    pictures.append(Image.fromarray(np.arange(256, dtype=np.uint8).repeat(196).reshape(224, 224)).convert("RGB"))  # every byte
    fast = Preprocessor(encoder.pixel_processor.processor, mode, 224)
    assert fast.value_table() is not None
    through_processor = Preprocessor(encoder.pixel_processor.processor, mode, 224)
    through_processor._table = None  # the processor's own resize, crop, rescale and normalise
    assert torch.equal(fast(pictures), through_processor(pictures))
    # A picture of another size in the batch: everything goes through the processor.
    mixed = pictures[:1] + random_images(2)
    assert torch.equal(fast(mixed), through_processor(mixed))
    # Settings the table cannot express (no normalising): the processor runs.
    plain = Preprocessor(encoder.pixel_processor.processor.__class__(do_normalize=False, size={"shortest_edge": 224},
                                                                     crop_size={"height": 224, "width": 224}), mode, 224)
    assert plain.value_table() is None
    assert torch.equal(plain(pictures), (torch.from_numpy(np.stack([np.asarray(p) for p in pictures])).permute(0, 3, 1, 2)
                                         .double() / 255).float())


def test_frozen_and_eval(encoder):
    encoder.train()
    encoder.requires_grad_(True)
    assert not encoder.training and not encoder.model.training
    assert not any(parameter.requires_grad for parameter in encoder.parameters())
    wrapper = torch.nn.Sequential(encoder)
    wrapper.train()  # a parent model switching to training mode leaves the encoder in eval
    assert not encoder.model.training
    pixel_values = encoder.preprocess(random_images(2)).requires_grad_(True)
    tokens = encoder(pixel_values)
    assert not tokens.requires_grad
    # ...and its output can feed a trainable layer (no inference-mode tensors)
    projection = torch.nn.Linear(encoder.width, 8)
    projection(tokens).sum().backward()
    assert projection.weight.grad is not None


def test_forward_rejects_wrong_pixel_shape(encoder):
    with pytest.raises(ValueError, match=r"\(B, 3, 224, 224\)"):
        encoder(torch.zeros(2, 3, 64, 64))


def test_flops_per_image_matches_flop_counter(encoder, clip_folder):
    eager = CLIPVisionModel.from_pretrained(clip_folder, attn_implementation="eager").eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        eager(pixel_values=torch.zeros(1, 3, 224, 224))
    assert encoder.flops_per_image() == counter.get_total_flops()


# ---------------------------------------------------------------- identity


def test_fingerprint_tracks_weights_and_preprocessing(clip_folder, tmp_path):
    first = VisionEncoder.from_pretrained(clip_folder)
    again = VisionEncoder.from_pretrained(clip_folder)
    assert first.fingerprint() == again.fingerprint()

    with torch.no_grad():  # one weight, one element
        again.model.state_dict()["embeddings.position_embedding.weight"][3, 5] += 1e-3
    assert again.fingerprint() != first.fingerprint()

    edited = tmp_path / "edited"
    shutil.copytree(clip_folder, edited)
    config_file = edited / "preprocessor_config.json"
    config = json.loads(config_file.read_text())
    config["image_mean"] = [0.5, 0.5, 0.5]
    config_file.write_text(json.dumps(config))
    assert VisionEncoder.from_pretrained(edited).fingerprint() != first.fingerprint()

    other_seed = make_random_clip(tmp_path / "seed1", seed=1)
    assert VisionEncoder.from_pretrained(other_seed).fingerprint() != first.fingerprint()


def test_name_or_path_is_kept(encoder, clip_folder):
    assert encoder.name_or_path == str(clip_folder)


def test_save_pretrained_round_trip(encoder, tmp_path):
    folder = encoder.save_pretrained(tmp_path / "saved")
    reloaded = VisionEncoder.from_pretrained(folder)
    assert reloaded.fingerprint() == encoder.fingerprint()
    assert reloaded.name_or_path == str(folder)


# ---------------------------------------------------------------- missing models


def test_missing_model_explains_both_ways(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    for source in (str(tmp_path / "no-such-clip"), "minimind-v-tests/no-such-clip"):
        with pytest.raises(VisionModelNotFoundError) as info:
            VisionEncoder.from_pretrained(source)
        message = str(info.value)
        assert source in message
        assert "hf download openai/clip-vit-base-patch32" in message
        assert "python -m minimind_v.train.clip" in message


def test_folder_without_preprocessor_config(clip_folder, tmp_path):
    folder = tmp_path / "weights-only"
    shutil.copytree(clip_folder, folder)
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(VisionModelNotFoundError, match="preprocessor_config.json"):
        VisionEncoder.from_pretrained(folder)


def test_folder_of_another_model_type(clip_folder, tmp_path):
    folder = tmp_path / "not-clip"
    shutil.copytree(clip_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_type is 'llama'"):
        VisionEncoder.from_pretrained(folder)


# ---------------------------------------------------------------- images of every kind


def save(image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def test_modes_become_rgb(tmp_path, encoder):
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    files = {
        "grey.png": save(rgb.convert("L"), tmp_path / "grey.png"),
        "bw.png": save(rgb.convert("1"), tmp_path / "bw.png"),
        "rgba.png": save(rgb.convert("RGBA"), tmp_path / "rgba.png"),
        "palette.gif": save(rgb.convert("P"), tmp_path / "palette.gif"),
        "cmyk.jpg": save(rgb.convert("CMYK"), tmp_path / "cmyk.jpg"),
        "grey16.png": save(Image.fromarray((rng.integers(0, 65536, (40, 60))).astype(np.uint16)), tmp_path / "grey16.png"),
    }
    for name, path in files.items():
        image = load_image(path)
        assert image.mode == "RGB" and image.size == (60, 40), name
    tokens = encoder.encode_images(list(files.values()))
    assert tokens.shape == (len(files), 50, 64) and torch.isfinite(tokens).all()


def test_grey_is_replicated_into_three_channels(tmp_path):
    grey = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16))
    rgb = np.asarray(load_image(save(grey, tmp_path / "g.png")))
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], np.asarray(grey))


def test_sixteen_bit_grey_is_rescaled_not_clipped():
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)  # 0, 1, 128, 255 in 8 bits
    rgb = np.asarray(to_rgb(Image.fromarray(values)))
    np.testing.assert_array_equal(rgb[0, :, 0], [0, 1, 128, 255])


def test_transparency_is_composited_on_white(tmp_path):
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (0, 0, 255, 0)  # fully transparent -> white
    rgba[1, 0] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    rgba[1, 1] = (0, 255, 0, 255)
    out = np.asarray(load_image(save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png"))).astype(int)
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert np.all(np.abs(out[1, 0] - 127) <= 1)
    assert out[1, 1].tolist() == [0, 255, 0]

    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    path = save(palette, tmp_path / "p.png", transparency=0)  # colour 0 is transparent
    assert np.asarray(load_image(path)).tolist() == [[[255, 255, 255], [200, 100, 50]]]


def test_huge_image_is_decoded(tmp_path, encoder):
    huge = Image.new("RGB", (6000, 4000), (200, 30, 60))
    path = save(huge, tmp_path / "huge.jpg", quality=50)
    image = load_image(path)
    assert image.size == (6000, 4000) and image.mode == "RGB"
    assert encoder.encode_images([path]).shape == (1, 50, 64)


def test_pixel_limit_policy(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    warned = save(Image.new("RGB", (40, 40)), tmp_path / "warned.png")  # 1600 px: PIL would warn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(warned).size == (40, 40)
    bomb = save(Image.new("RGB", (100, 100)), tmp_path / "bomb.png")  # 10000 px > 2 x limit
    with pytest.raises(ImageError, match=r"bomb\.png.*MAX_IMAGE_PIXELS"):
        load_image(bomb)


def test_truncated_file_names_the_file(tmp_path):
    rng = np.random.default_rng(2)
    full = save(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), tmp_path / "full.jpg")
    data = full.read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"truncated\.jpg.*truncated"):
        load_image(truncated)


def test_not_an_image_and_missing_file(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("these are not pixels")
    with pytest.raises(ImageError, match=r"notes\.jpg.*not an image"):
        load_image(text)
    with pytest.raises(ImageError, match=r"absent\.png.*no such"):
        load_image(tmp_path / "absent.png")
    assert issubclass(ImageError, ValueError)


def test_bad_image_inside_a_batch_names_the_file(tmp_path, encoder):
    good = save(random_images(1)[0], tmp_path / "good.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(ImageError, match=r"bad\.png"):
        encoder.encode_images([good, bad])


def test_list_image_files(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.jpg", "a.PNG", "sub/c.webp", "readme.txt"):
        (tmp_path / name).write_bytes(b"")
    assert list_image_files(tmp_path) == ["a.PNG", "b.jpg", "sub/c.webp"]
