"""The benchmark scripts still run against the package as it is: each in its smallest setting, in a
fresh process, checked on what it prints (not on how fast anything was)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_bench_decode_paths_make_the_same_tokens():
    out = run_script("benchmarks/bench_decode.py", "--preset", "tiny", "--new-tokens", "6", "--repeats", "1",
                     "--batch", "3", "--bounds")
    rows = [line for line in out.splitlines() if re.search(r"\d+/6\s", line)]
    # the transformers loop, the shipped generate, use_cache=False, prompt lookup in the package's loop and in
    # transformers', the fewest-operations loop eager and compiled
    assert len(rows) == 7, out
    assert all(" 6/6 " in row for row in rows), out
    assert "equal the one-at-a-time answers for 3 of 3 prompts" in out


def test_fewest_operations_bound_makes_the_shipped_tokens():
    """The bound's own step (static key/value buffer attended with a mask) answers as generate does,
    token for token, over many steps of one prompt."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_decode

    model = bench_decode.make_model("tiny", 1)
    with torch.no_grad():  # larger weights than training's init, so greedy tokens are far from ties
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.1)
    ids, image_tokens = bench_decode.make_prompt(1)
    shipped = model.generate(ids, attention_mask=torch.ones_like(ids), image_tokens=image_tokens, do_sample=False,
                             max_new_tokens=40, min_new_tokens=40, eos_token_id=2, pad_token_id=0)[:, ids.shape[1]:]
    lean = bench_decode.FewestOperations(model, capacity=ids.shape[1] + 40)
    assert torch.equal(lean(ids, image_tokens, 40), shipped)
    assert len(set(shipped[0].tolist())) > 5  # not one token repeated: the test can tell paths apart
    with pytest.raises(ValueError, match="exceed the buffer"):
        lean(ids, image_tokens, 41)


def test_bench_vlm_quick_runs_each_precision():
    for precision in ("fp32", "bf16"):
        out = run_script("benchmarks/bench_vlm.py", "--quick", "--skip-memory", "--precision", precision)
        device_line = next(line for line in out.splitlines() if line.startswith("device:"))
        assert device_line.endswith("bf16 autocast" if precision == "bf16" else "float32"), device_line
        assert "summary:" in out, out


def test_the_original_row_feeds_v1_its_samples_as_v1s_dataset_pads_them(monkeypatch):
    """bench_vlm --original: our chat with v1's placeholder ids in place of ours, padded with 0 to
    v1's 200 tokens and shifted by one, the loss mask on exactly the answer and its </s>."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_vlm

    ours = [900] * bench_vlm.NUM_IMAGE_TOKENS
    monkeypatch.setattr(bench_vlm, "image_placeholder", lambda tokenizer, n: ("", ours[:n]))
    ignore = bench_vlm.IGNORE_INDEX
    ids = [1, 2, *ours, 3, 4, 5]  # text, the picture, a question word, the answer 4 and its </s> 5
    chat = bench_vlm.Chat("a.png", ids, [ignore] * (len(ids) - 2) + [4, 5])
    world = type("World", (), {"tokenizer": None, "chats": [chat]})()
    X, Y, mask = bench_vlm.OriginalRow._padded(world)
    assert X.shape == Y.shape == mask.shape == (1, 199)
    v1 = [1, 2, *bench_vlm.V1_IMAGE_IDS, 3, 4, 5] + [0] * 145
    assert X[0].tolist() == v1[:-1] and Y[0].tolist() == v1[1:]
    assert Y[0][mask[0].bool()].tolist() == [4, 5]
