"""The frozen-feature cache: same tokens as the encoder, keyed by encoder and image files, atomic builds."""

import io
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minimind_v.data.features import FeatureCache, StaleCacheError, ensure_cache
from minimind_v.data.images import ImageError
from minimind_v.model.vision import VisionEncoder
from minimind_v.testing import make_random_clip

NAMES = [f"img{i:02d}.png" for i in range(9)] + ["sub/deep.jpg"]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return make_random_clip(tmp_path_factory.mktemp("clip") / "tiny", image_size=64, patch_size=16, width=32)


@pytest.fixture(scope="module")
def encoder(clip_folder):
    return VisionEncoder.from_pretrained(clip_folder)


@pytest.fixture
def image_dir(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate(NAMES):
        pixels = rng.integers(0, 256, (40 + 7 * i, 90 - 3 * i, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)
    return folder


def encode_directly(encoder, image_dir, names, batch_size):
    return encoder.encode_images([image_dir / name for name in names], batch_size=batch_size)


def test_cache_returns_what_the_encoder_returns(encoder, image_dir, tmp_path):
    cache = FeatureCache.build(encoder, image_dir, tmp_path / "cache", batch_size=4, progress=False)
    assert cache.names == sorted(NAMES) and len(cache) == len(NAMES)
    assert (cache.num_tokens, cache.width, cache.dtype) == (17, 32, torch.float16)
    expected = encode_directly(encoder, image_dir, cache.names, batch_size=4).to(torch.float16)
    order = [cache.names[i] for i in (7, 0, 3, 3, 9)]  # any order, repeats allowed
    got = cache.get(order)
    assert got.shape == (5, 17, 32) and got.dtype == torch.float16
    torch.testing.assert_close(got, expected[[7, 0, 3, 3, 9]], rtol=0, atol=0)
    torch.testing.assert_close(cache["sub/deep.jpg"], expected[cache.names.index("sub/deep.jpg")], rtol=0, atol=0)
    torch.testing.assert_close(cache.get_rows(cache.rows(order)), got, rtol=0, atol=0)
    # a reopened cache reads the same bytes from disk
    reopened = FeatureCache.open(tmp_path / "cache", encoder, image_dir=image_dir)
    torch.testing.assert_close(reopened.get(cache.names), expected, rtol=0, atol=0)


def test_float32_cache_is_exact_for_any_batch_size(encoder, image_dir, tmp_path):
    cache = FeatureCache.build(
        encoder, image_dir, tmp_path / "cache32", batch_size=3, dtype=torch.float32, progress=False
    )
    expected = encode_directly(encoder, image_dir, cache.names, batch_size=len(NAMES))
    torch.testing.assert_close(cache.get(cache.names), expected, rtol=1e-5, atol=1e-6)


def test_worker_processes_give_the_same_tokens(encoder, image_dir, tmp_path):
    serial = FeatureCache.build(encoder, image_dir, tmp_path / "serial", batch_size=4, progress=False, num_workers=0)
    parallel = FeatureCache.build(encoder, image_dir, tmp_path / "parallel", batch_size=4, progress=False, num_workers=2)
    torch.testing.assert_close(parallel.get(NAMES), serial.get(NAMES), rtol=0, atol=0)


def test_unknown_name_is_named(encoder, image_dir, tmp_path):
    cache = FeatureCache.build(encoder, image_dir, tmp_path / "cache", names=NAMES[:3], progress=False)
    assert "img05.png" not in cache
    with pytest.raises(KeyError, match="img05.png"):
        cache.get(["img00.png", "img05.png"])


def test_missing_images_are_listed_before_encoding(encoder, image_dir, tmp_path):
    with pytest.raises(ImageError, match=r"2 of 4 images are missing.*'ghost1.png'"):
        FeatureCache.build(encoder, image_dir, tmp_path / "cache", names=NAMES[:2] + ["ghost1.png", "ghost2.png"])


def test_progress_summary_line(encoder, image_dir, tmp_path, capsys):
    FeatureCache.build(encoder, image_dir, tmp_path / "cache", progress=True)
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"{len(NAMES)} images" in summary and "images/s" in summary


# ---------------------------------------------------------------- refusing stale caches


def test_refuses_cache_of_other_weights(encoder, image_dir, tmp_path):
    FeatureCache.build(encoder, image_dir, tmp_path / "cache", progress=False)
    FeatureCache.open(tmp_path / "cache", encoder.fingerprint())  # a fingerprint string works too
    other = VisionEncoder.from_pretrained(
        make_random_clip(tmp_path / "other", image_size=64, patch_size=16, width=32, seed=7)
    )
    with pytest.raises(StaleCacheError, match="not by this encoder"):
        FeatureCache.open(tmp_path / "cache", other)


def test_refuses_cache_after_an_image_changed(encoder, image_dir, tmp_path):
    FeatureCache.build(encoder, image_dir, tmp_path / "cache", progress=False)
    target = image_dir / "img04.png"
    before = os.stat(target)
    Image.new("RGB", (33, 33), (1, 2, 3)).save(target)
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))  # a clearly later mtime
    with pytest.raises(StaleCacheError, match=r"1 of 10 images .* changed.*img04\.png"):
        FeatureCache.open(tmp_path / "cache", encoder, image_dir=image_dir)
    FeatureCache.open(tmp_path / "cache", encoder)  # without image_dir the files are not checked


def test_refuses_cache_after_an_image_was_touched_or_removed(encoder, image_dir, tmp_path):
    FeatureCache.build(encoder, image_dir, tmp_path / "cache", progress=False)
    status = os.stat(image_dir / "img01.png")
    os.utime(image_dir / "img01.png", ns=(status.st_atime_ns, status.st_mtime_ns + 1))  # same bytes, new time
    with pytest.raises(StaleCacheError, match="img01.png"):
        FeatureCache.open(tmp_path / "cache", encoder, image_dir=image_dir)
    os.utime(image_dir / "img01.png", ns=(status.st_atime_ns, status.st_mtime_ns))
    FeatureCache.open(tmp_path / "cache", encoder, image_dir=image_dir)
    (image_dir / "img02.png").unlink()
    with pytest.raises(StaleCacheError, match=r"\(1 missing\).*img02\.png"):
        FeatureCache.open(tmp_path / "cache", encoder, image_dir=image_dir)


def test_refuses_features_file_that_does_not_match_meta(encoder, image_dir, tmp_path):
    cache = FeatureCache.build(encoder, image_dir, tmp_path / "cache", progress=False)
    path = tmp_path / "cache" / cache.meta["features_file"]
    np.save(path, np.zeros((3, 17, 32), dtype=np.float16))
    with pytest.raises(StaleCacheError, match=r"\(3, 17, 32\)"):
        FeatureCache.open(tmp_path / "cache", encoder)


# ---------------------------------------------------------------- atomic builds


def files_in(folder):
    return sorted(path.name for path in folder.iterdir())


def interrupt_on_batch(monkeypatch, encoder, batch_number):
    calls = {"count": 0}
    forward = encoder.forward

    def failing_forward(pixel_values):
        calls["count"] += 1
        if calls["count"] == batch_number:
            raise KeyboardInterrupt  # as if Ctrl-C hit during the build
        return forward(pixel_values)

    monkeypatch.setattr(encoder, "forward", failing_forward)


def test_interrupted_build_leaves_no_valid_looking_cache(encoder, image_dir, tmp_path, monkeypatch):
    interrupt_on_batch(monkeypatch, encoder, batch_number=2)
    with pytest.raises(KeyboardInterrupt):
        FeatureCache.build(encoder, image_dir, tmp_path / "cache", batch_size=4, progress=False)
    monkeypatch.undo()
    assert files_in(tmp_path / "cache") == []  # no meta.json, no partial or orphaned token file
    with pytest.raises(StaleCacheError, match="no complete feature cache"):
        FeatureCache.open(tmp_path / "cache", encoder)


def test_interrupted_rebuild_keeps_the_previous_cache(encoder, image_dir, tmp_path, monkeypatch):
    old = FeatureCache.build(encoder, image_dir, tmp_path / "cache", names=NAMES[:4], progress=False)
    old_tokens = old.get(NAMES[:4])
    interrupt_on_batch(monkeypatch, encoder, batch_number=2)
    with pytest.raises(KeyboardInterrupt):
        FeatureCache.build(encoder, image_dir, tmp_path / "cache", batch_size=4, progress=False)
    monkeypatch.undo()
    kept = FeatureCache.open(tmp_path / "cache", encoder, image_dir=image_dir)
    assert kept.names == NAMES[:4]
    torch.testing.assert_close(kept.get(NAMES[:4]), old_tokens, rtol=0, atol=0)
    # a completed rebuild replaces it and deletes the old token file
    FeatureCache.build(encoder, image_dir, tmp_path / "cache", progress=False)
    assert len([name for name in files_in(tmp_path / "cache") if name.endswith(".npy")]) == 1


def test_killed_build_leaves_no_valid_looking_cache(clip_folder, image_dir, tmp_path, encoder):
    """A build killed outright (SIGKILL: no finally blocks run) must not look complete."""
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        from minimind_v.data.features import FeatureCache
        from minimind_v.model.vision import VisionEncoder
        encoder = VisionEncoder.from_pretrained({str(clip_folder)!r})
        forward, calls = encoder.forward, []
        def dying_forward(pixel_values):
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return forward(pixel_values)
        encoder.forward = dying_forward
        FeatureCache.build(encoder, {str(image_dir)!r}, {str(tmp_path / "cache")!r}, batch_size=4, progress=False)
        """
    )
    project_root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=project_root
    )
    assert result.returncode == -signal.SIGKILL, result.stderr
    left = files_in(tmp_path / "cache")
    assert "meta.json" not in left and any(name.endswith(".partial") for name in left)
    with pytest.raises(StaleCacheError, match="no complete feature cache"):
        FeatureCache.open(tmp_path / "cache", encoder)
    # the next build clears the dead process's partial file
    FeatureCache.build(encoder, image_dir, tmp_path / "cache", progress=False)
    assert not any(name.endswith(".partial") for name in files_in(tmp_path / "cache"))


# ---------------------------------------------------------------- ensure_cache and pickling


def test_ensure_cache_builds_once_and_rebuilds_when_needed(encoder, image_dir, tmp_path, monkeypatch):
    builds = []
    real_build = FeatureCache.build.__func__

    def counting_build(cls, *args, **kwargs):
        builds.append(kwargs.get("names"))
        return real_build(cls, *args, **kwargs)

    monkeypatch.setattr(FeatureCache, "build", classmethod(counting_build))
    cache_dir = tmp_path / "cache"
    first = ensure_cache(encoder, image_dir, cache_dir, names=NAMES[:5], progress=False)
    second = ensure_cache(encoder, image_dir, cache_dir, names=NAMES[:3], progress=False)  # a subset: reuse
    assert len(builds) == 1
    torch.testing.assert_close(second.get(NAMES[:3]), first.get(NAMES[:3]), rtol=0, atol=0)
    ensure_cache(encoder, image_dir, cache_dir, names=NAMES[:6], progress=False)  # a new name: rebuild
    assert len(builds) == 2
    status = os.stat(image_dir / "img00.png")
    os.utime(image_dir / "img00.png", ns=(status.st_atime_ns, status.st_mtime_ns + 10**9))
    ensure_cache(encoder, image_dir, cache_dir, names=NAMES[:6], progress=False)  # a changed image: rebuild
    assert len(builds) == 3
    ensure_cache(encoder, image_dir, cache_dir, progress=False)  # names=None: every image in the folder
    assert len(builds) == 4 and builds[-1] == sorted(NAMES)
    assert json.loads((cache_dir / "meta.json").read_text())["num_images"] == len(NAMES)


def test_pickled_cache_does_not_carry_the_tokens(encoder, image_dir, tmp_path):
    cache = FeatureCache.build(encoder, image_dir, tmp_path / "cache", progress=False)
    cache.get(NAMES)  # maps the file
    payload = pickle.dumps(cache)
    assert len(payload) < cache.features.nbytes
    torch.testing.assert_close(pickle.loads(payload).get(NAMES), cache.get(NAMES), rtol=0, atol=0)


def test_rejects_bfloat16_storage(encoder, image_dir, tmp_path):
    with pytest.raises(ValueError, match="float16 or torch.float32"):
        FeatureCache.build(encoder, image_dir, tmp_path / "cache", dtype=torch.bfloat16)


# ----------------------------------------------------------------------------- parquet pictures


def test_meta_lists_every_parquet_picture_it_covers(encoder, tmp_path):
    """A cache of a parquet dataset lists, in meta.json, the name of every picture a sample shows
    ("<file>#<row>/<k>": one per <image> tag, none for a text-only row), so that the cache can be
    checked against the data it serves. The truth is the rows as written here."""
    from minimind_v.data.parquet import dataset_picture_names, placeholder_picture, write_chat_parquet

    def png(value):
        buffer = io.BytesIO()
        Image.new("RGB", (40, 40), (value, 255 - value, 7)).save(buffer, "PNG")
        return buffer.getvalue()

    def row(tags, pictures):
        question = "<image>" * tags + " what is it?"
        return {"conversations": [{"role": "user", "content": question}, {"role": "assistant", "content": "a"}],
                "image_bytes": pictures}

    folder = tmp_path / "shards"
    folder.mkdir()
    # per file: the <image> tags of each row (0: text-only, with the 8x8 placeholder)
    layout = {"a.parquet": [1, 0, 2, 1, 1], "b.parquet": [2, 1, 0]}
    for file_name, tags in layout.items():
        rows = [row(n, [png(10 * i + k) for k in range(n)] or [placeholder_picture()]) for i, n in enumerate(tags)]
        write_chat_parquet(folder / file_name, rows, several_pictures=True, row_group_size=2)
    expected = [f"{file_name}#{i}/{k}" for file_name, tags in layout.items() for i, n in enumerate(tags)
                for k in range(n)]

    names = dataset_picture_names(folder)
    assert names == expected
    cache = ensure_cache(encoder, folder, tmp_path / "cache", names=names, progress=False)
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text(encoding="utf-8"))
    assert meta["names"] == expected and meta["num_images"] == len(expected) == 8
    assert cache.uncovered(expected) == [] and all(name in cache for name in expected)

    # A cache of some rows covers their pictures only, and says which others it lacks.
    some = ensure_cache(encoder, folder, tmp_path / "some", names=dataset_picture_names(folder, rows=[0, 5, 7]),
                        progress=False)  # global rows 5 and 7: b.parquet's rows 0 and 2 (text-only)
    assert some.names == ["a.parquet#0/0", "b.parquet#0/0", "b.parquet#0/1"]
    assert some.uncovered(expected) == [name for name in expected if name not in some.names]
    assert set(some.names) | set(some.uncovered(expected)) == set(expected)
