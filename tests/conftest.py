"""Shared fixtures: a tiny shapes world, a tokenizer trained on it, a tiny random CLIP, tiny VLMs.

Everything is built once per test session, in seconds, with no downloads. Tests that change
files copy what they need first: the session fixtures are shared and must stay intact.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "OMP_NUM_THREADS", "TORCHELASTIC_RUN_ID")

# Training runs in float32 in the tests unless asked otherwise, so that every machine computes the
# same references (bfloat16 products, where the CPU has them, are tested in test_precision.py).
os.environ.setdefault("MINIMIND_V_PRECISION", "fp32")

# The tiny CLIP: 64x64 pixels in 32x32 patches -> 2x2 patches + CLS = 5 tokens of width 32.
TINY_CLIP = dict(image_size=64, patch_size=32, width=32, layers=1, heads=2)
TINY_CLIP_TOKENS = 1 + (TINY_CLIP["image_size"] // TINY_CLIP["patch_size"]) ** 2


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    """A shapes world with 40 caption records, 40 SFT records and 16 eval questions (96 px images)."""
    from minimind_v.data.shapes import ShapesWorldConfig, generate_world

    out = tmp_path_factory.mktemp("world") / "world"
    config = ShapesWorldConfig(seed=0, n_pretrain=40, n_sft=40, n_eval=16, n_eval_images=2,
                               image_size=96, workers=1)
    generate_world(out, config, progress=False)
    return out


@pytest.fixture(scope="session")
def world_tokenizer_dir(tiny_world, tmp_path_factory) -> Path:
    """A byte-level BPE (with <|image|>) trained on the tiny world's words, saved to a folder."""
    from minimind_v.recipe import world_texts
    from minimind_v.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer") / "tokenizer"
    train_tokenizer(world_texts(tiny_world), folder, vocab_size=400)
    return folder


@pytest.fixture(scope="session")
def world_tokenizer(world_tokenizer_dir):
    from minimind_v.tokenizer import load_tokenizer

    return load_tokenizer(world_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    from minimind_v.testing import make_random_clip

    return make_random_clip(tmp_path_factory.mktemp("clip") / "tiny_clip", seed=0, **TINY_CLIP)


@pytest.fixture(scope="session")
def tiny_encoder(tiny_clip_dir):
    from minimind_v.model.vision import VisionEncoder

    return VisionEncoder.from_pretrained(tiny_clip_dir)


@pytest.fixture(scope="session")
def make_tiny_vlm(world_tokenizer):
    """make_tiny_vlm(seed=0, **config) -> a small MiniMindVLM for the world tokenizer and the tiny CLIP."""
    from minimind_v.model.vlm import MiniMindVLM, VLMConfig
    from minimind_v.tokenizer import image_placeholder

    def make(seed: int = 0, **overrides):
        _, ids = image_placeholder(world_tokenizer, TINY_CLIP_TOKENS)
        config = dict(vocab_size=len(world_tokenizer), dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      max_position_embeddings=512, vision_width=TINY_CLIP["width"],
                      num_image_tokens=TINY_CLIP_TOKENS, image_token_ids=ids,
                      vision_model="tiny_clip")
        torch.manual_seed(seed)
        return MiniMindVLM(VLMConfig(**{**config, **overrides}))

    return make


@pytest.fixture(scope="session")
def save_tiny_sft(make_tiny_vlm, world_tokenizer, tiny_clip_dir):
    """save_tiny_sft(folder, seed) -> a saved tiny MiniMind-V folder (its tokenizer and tiny CLIP
    beside it), weights drawn larger than the 0.02 init so that it says varied things and its
    attention is far from even."""
    import shutil

    def save(folder: Path, seed: int = 0) -> Path:
        model = make_tiny_vlm(seed=seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0, 0.5)
        model.save_pretrained(folder)
        world_tokenizer.save_pretrained(folder)
        shutil.copytree(tiny_clip_dir, folder / "tiny_clip")
        return folder

    return save


@pytest.fixture
def alone(monkeypatch):
    """No torchrun variables in the environment; torch's thread count restored afterwards."""
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def subprocess_env() -> dict:
    """The environment for a child Python: this repository importable, no torchrun variables."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def child_env():
    return subprocess_env()
