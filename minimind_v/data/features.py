"""A disk cache of the frozen encoder's patch tokens: encode every image once, read it ever after.

The CLIP encoder never trains, so the 50 tokens it makes for an image are the same in every
epoch. Encoding them once and memory-mapping the result turns the most expensive part of a
training step into a gather from the page cache.

A cache folder holds:
    meta.json            the commit record: encoder fingerprint, image names, per-image file
                         stats, shape, dtype and the name of the features file
    features-<id>.npy    tokens (N, num_tokens, width), float16 by default, read with np.memmap

Safety rules:
- The cache is keyed by `VisionEncoder.fingerprint()` (weights + architecture + preprocessing):
  opening it with any other encoder raises `StaleCacheError`.
- Building is atomic. Tokens go to a `.partial` file, which is renamed to a fresh
  `features-<id>.npy`; only then is meta.json replaced (itself via a temporary file and
  os.replace). meta.json is the single commit point, so an interrupted build leaves either the
  previous complete cache or no meta.json at all, never a cache that looks valid but is not.
- Each image's file size and modification time (ns) are recorded; `open(..., image_dir=...)`
  refuses a cache whose images changed, disappeared or were replaced.

Staleness by size + mtime_ns rather than a content hash: checking a content hash means reading
every image again on every open (tens of GB for the real dataset), while a stat costs
microseconds per file. An edit that keeps both size and the nanosecond mtime is not a realistic
accident; the cost of the cheap check is a needless rebuild after copying images without
preserving times (`cp` without -p), which is safe, only slow.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .images import ImageError, list_image_files

META_FILE = "meta.json"
_PARTIAL_NAME = re.compile(r"^features-[0-9a-f]{12}\.npy\.(?P<host>.+)-(?P<pid>\d+)\.partial$")
FORMAT_VERSION = 1

# Token dtypes a cache can hold; numpy has no bfloat16.
_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32}


class StaleCacheError(RuntimeError):
    """The feature cache is missing, incomplete, or was built from other weights, preprocessing or images."""


class FeatureCache:
    """Read-only view of a built cache: `cache[name] -> (T, W)`, `cache.get(names) -> (B, T, W)`.

    Make one with `FeatureCache.build`, `FeatureCache.open` or `ensure_cache`. The token file is
    memory-mapped lazily, so a cache can be handed to DataLoader workers cheaply (pickling it
    does not copy the tokens).
    """

    def __init__(self, cache_dir: str | os.PathLike, meta: dict):
        self.cache_dir = Path(cache_dir)
        self.meta = meta
        self.names: list[str] = list(meta["names"])
        self.index: dict[str, int] = {name: row for row, name in enumerate(self.names)}
        self.fingerprint: str = meta["fingerprint"]
        self.num_tokens: int = int(meta["num_tokens"])
        self.width: int = int(meta["width"])
        self.dtype: torch.dtype = getattr(torch, meta["dtype"])
        self._features: np.ndarray | None = None

    # ----------------------------------------------------------------- build / open

    @classmethod
    def build(
        cls,
        encoder,
        image_dir: str | os.PathLike,
        cache_dir: str | os.PathLike,
        names: Sequence[str] | None = None,
        batch_size: int = 64,
        dtype: torch.dtype = torch.float16,
        progress: bool = True,
        num_workers: int | None = None,
    ) -> "FeatureCache":
        """Encode `names` (default: every image under image_dir) with `encoder` and store the tokens.

        names are paths relative to image_dir, as in the dataset's "image" fields (duplicates are
        encoded once). num_workers: processes decoding images (None: a few for large builds).
        Replaces any cache already in cache_dir, atomically.
        """
        image_dir, cache_dir = Path(image_dir), Path(cache_dir)
        if dtype not in _NUMPY_DTYPES:
            raise ValueError(f"dtype must be torch.float16 or torch.float32, got {dtype}")
        names = _unique_names(names) if names is not None else list_image_files(image_dir)
        if not names:
            raise ValueError(f"no images to encode: {image_dir} holds no image files and no names were given")
        # Stat before reading: if a file changes during the build, open() will see it as stale.
        stats = _stat_images(image_dir, names)
        if num_workers is None:
            num_workers = min(8, (os.cpu_count() or 1) - 1) if len(names) >= 512 else 0
        fingerprint = encoder.fingerprint()
        count, tokens, width = len(names), encoder.num_tokens, encoder.width

        cache_dir.mkdir(parents=True, exist_ok=True)
        _remove_abandoned_partials(cache_dir)
        features_file = f"features-{uuid.uuid4().hex[:12]}.npy"
        partial = cache_dir / f"{features_file}.{socket.gethostname()}-{os.getpid()}.partial"
        previous = _read_meta_or_none(cache_dir)
        started = time.perf_counter()
        committed = False
        try:
            store = np.lib.format.open_memmap(partial, mode="w+", dtype=_NUMPY_DTYPES[dtype], shape=(count, tokens, width))
            paths = [image_dir / name for name in names]
            with tqdm(total=count, unit="img", desc="encoding images", disable=not progress) as bar:
                for start, pixel_values in encoder.pixel_batches(paths, batch_size, num_workers):
                    batch = encoder(pixel_values).to(dtype)  # (b, 3, S, S) -> (b, T, W)
                    if not torch.isfinite(batch).all():
                        raise ValueError(
                            f"encoder output for images {names[start]!r}.. is not finite in {dtype}; "
                            f"build with dtype=torch.float32"
                        )
                    store[start : start + len(batch)] = batch.cpu().numpy()
                    bar.update(len(batch))
            store.flush()
            del store
            _fsync(partial)
            os.replace(partial, cache_dir / features_file)
            meta = {
                "format": FORMAT_VERSION,
                "fingerprint": fingerprint,
                "encoder": getattr(encoder, "name_or_path", ""),
                "features_file": features_file,
                "num_images": count,
                "num_tokens": tokens,
                "width": width,
                "dtype": str(dtype).removeprefix("torch."),
                "image_dir": str(image_dir.resolve()),
                "names": names,
                "image_stats": stats.tolist(),  # [[size_bytes, mtime_ns], ...] per name
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            _write_json_atomically(cache_dir / META_FILE, meta)  # the commit point
            committed = True
        finally:
            if not committed:
                for leftover in (partial, cache_dir / features_file):
                    leftover.unlink(missing_ok=True)
        if previous is not None and previous.get("features_file") not in (None, features_file):
            (cache_dir / previous["features_file"]).unlink(missing_ok=True)
        seconds = time.perf_counter() - started
        cache = cls(cache_dir, meta)
        if progress:
            megabytes = (cache_dir / features_file).stat().st_size / 1e6
            print(
                f"feature cache: {count} images -> {cache_dir} ({count}x{tokens}x{width} {meta['dtype']}, "
                f"{megabytes:.1f} MB) in {seconds:.1f} s, {count / max(seconds, 1e-9):.1f} images/s"
            )
        return cache

    @classmethod
    def open(
        cls,
        cache_dir: str | os.PathLike,
        encoder_or_fingerprint,
        image_dir: str | os.PathLike | None = None,
    ) -> "FeatureCache":
        """Open a built cache, refusing it (StaleCacheError) if it does not belong to this encoder.

        With image_dir, also refuse it if any cached image file changed or disappeared.
        """
        cache_dir = Path(cache_dir)
        meta = _read_meta_or_none(cache_dir)
        rebuild = "rebuild it with FeatureCache.build(encoder, image_dir, cache_dir) or ensure_cache(...)"
        if meta is None:
            raise StaleCacheError(
                f"no complete feature cache in {cache_dir} (missing or unreadable {META_FILE}; "
                f"an interrupted build leaves none): {rebuild}"
            )
        expected = (
            encoder_or_fingerprint if isinstance(encoder_or_fingerprint, str) else encoder_or_fingerprint.fingerprint()
        )
        if meta["fingerprint"] != expected:
            raise StaleCacheError(
                f"feature cache {cache_dir} was built by encoder {meta['fingerprint']} ({meta.get('encoder')!r}), "
                f"not by this encoder ({expected}): other weights or preprocessing give other tokens; {rebuild}"
            )
        cache = cls(cache_dir, meta)
        cache._check_features_file()
        if image_dir is not None:
            cache.check_images(image_dir)
        return cache

    def check_images(self, image_dir: str | os.PathLike) -> None:
        """Raise StaleCacheError if any cached image under image_dir changed (size or mtime) or is gone."""
        image_dir = Path(image_dir)
        recorded = np.asarray(self.meta["image_stats"], dtype=np.int64).reshape(-1, 2)
        current = _stat_images(image_dir, self.names, missing_ok=True)  # (N, 2), -1 where missing
        changed = np.flatnonzero((current != recorded).any(axis=1))
        if len(changed):
            gone = [self.names[i] for i in changed if current[i, 0] < 0]
            examples = ", ".join(repr(self.names[i]) for i in changed[:3])
            raise StaleCacheError(
                f"feature cache {self.cache_dir} is stale: {len(changed)} of {len(self.names)} images in "
                f"{image_dir} changed since it was built ({len(gone)} missing), e.g. {examples}; rebuild it "
                f"with FeatureCache.build(encoder, image_dir, cache_dir) or ensure_cache(...)"
            )

    # ----------------------------------------------------------------- reading

    @property
    def features(self) -> np.ndarray:
        """All tokens as a read-only memory map (N, num_tokens, width)."""
        if self._features is None:
            self._features = self._check_features_file()
        return self._features

    def rows(self, names: Sequence[str]) -> np.ndarray:
        """Row numbers (B,) of `names`; a dataset can compute them once and use get_rows after."""
        try:
            return np.fromiter((self.index[name] for name in names), dtype=np.int64, count=len(names))
        except KeyError as err:
            raise KeyError(
                f"image {err.args[0]!r} is not in the feature cache {self.cache_dir} "
                f"({len(self.names)} images from {self.meta.get('image_dir')})"
            ) from None

    def get_rows(self, rows) -> torch.Tensor:
        """Tokens of rows (B,) -> (B, num_tokens, width), gathered from the memory map in one index."""
        rows = np.asarray(rows, dtype=np.int64)
        return torch.from_numpy(np.asarray(self.features[rows]))

    def get(self, names: Sequence[str]) -> torch.Tensor:
        """Tokens of images `names` -> (B, num_tokens, width) in the cache dtype."""
        return self.get_rows(self.rows(names))

    def __getitem__(self, name: str) -> torch.Tensor:
        """Tokens of one image -> (num_tokens, width)."""
        return self.get([name])[0]

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return (
            f"FeatureCache({str(self.cache_dir)!r}, images={len(self)}, num_tokens={self.num_tokens}, "
            f"width={self.width}, dtype={self.meta['dtype']}, fingerprint={self.fingerprint!r})"
        )

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_features"] = None  # reopen the memory map in the receiving process
        return state

    def _check_features_file(self) -> np.ndarray:
        path = self.cache_dir / self.meta["features_file"]
        expected = (len(self.names), self.num_tokens, self.width)
        try:
            features = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise StaleCacheError(f"feature cache {self.cache_dir}: cannot read {path.name} ({err}); rebuild it") from None
        if features.shape != expected or features.dtype != np.dtype(self.meta["dtype"]):
            raise StaleCacheError(
                f"feature cache {self.cache_dir}: {path.name} holds {features.shape} {features.dtype}, "
                f"meta.json says {expected} {self.meta['dtype']}; rebuild it"
            )
        return features


def ensure_cache(
    encoder,
    image_dir: str | os.PathLike,
    cache_dir: str | os.PathLike,
    names: Sequence[str] | None = None,
    batch_size: int = 64,
    dtype: torch.dtype = torch.float16,
    progress: bool = True,
    num_workers: int | None = None,
) -> FeatureCache:
    """Open the cache in cache_dir if it is valid for this encoder, these images and names; else build it.

    In multi-process training, call it on one process first (the build is not shared), then open.
    """
    fingerprint = encoder.fingerprint()
    wanted = _unique_names(names) if names is not None else list_image_files(image_dir)
    try:
        cache = FeatureCache.open(cache_dir, fingerprint, image_dir=image_dir)
        missing = [name for name in wanted if name not in cache.index]
        if not missing and cache.dtype == dtype:
            return cache
        reason = (
            f"{len(missing)} requested images are not in it, e.g. {missing[0]!r}"
            if missing
            else f"it holds {cache.dtype}, {dtype} was asked"
        )
    except StaleCacheError as err:
        reason = str(err)
    if progress:
        print(f"building the feature cache: {reason}")
    return FeatureCache.build(
        encoder, image_dir, cache_dir, names=wanted, batch_size=batch_size, dtype=dtype,
        progress=progress, num_workers=num_workers,
    )


# --------------------------------------------------------------------- file helpers


def _unique_names(names: Sequence) -> list[str]:
    """Names as '/'-separated strings, each once, in first-seen order."""
    return list(dict.fromkeys(Path(name).as_posix() if isinstance(name, os.PathLike) else str(name) for name in names))


def _stat_images(image_dir: Path, names: Sequence[str], missing_ok: bool = False) -> np.ndarray:
    """(N, 2) int64 [size_bytes, mtime_ns] per image; rows of missing files are -1 if missing_ok."""
    stats = np.full((len(names), 2), -1, dtype=np.int64)
    missing = []
    for row, name in enumerate(names):  # one stat() system call per file; I/O, not tensor work
        try:
            status = os.stat(image_dir / name)
            stats[row] = (status.st_size, status.st_mtime_ns)
        except (FileNotFoundError, NotADirectoryError):
            missing.append(name)
    if missing and not missing_ok:
        raise ImageError(
            f"{len(missing)} of {len(names)} images are missing from {image_dir}, e.g. "
            + ", ".join(repr(name) for name in missing[:5])
        )
    return stats


def _read_meta_or_none(cache_dir: Path) -> dict | None:
    try:
        meta = json.loads((cache_dir / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT_VERSION else None


def _write_json_atomically(path: Path, payload: dict) -> None:
    temporary = path.with_name(f"{path.name}.{socket.gethostname()}-{os.getpid()}.tmp")
    try:
        with open(temporary, "w") as handle:
            json.dump(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    _fsync(path.parent)  # make the rename itself durable


def _fsync(path: Path) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return  # e.g. folders on Windows cannot be opened; durability is best effort there
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _remove_abandoned_partials(cache_dir: Path) -> None:
    """Delete .partial token files left by killed builds on this machine (their process is gone)."""
    if os.name != "posix":
        return
    host = socket.gethostname()
    for partial in cache_dir.glob("*.partial"):
        owner = _PARTIAL_NAME.match(partial.name)  # features-<id>.npy.<host>-<pid>.partial
        if owner is None or owner["host"] != host:
            continue
        try:
            os.kill(int(owner["pid"]), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            partial.unlink(missing_ok=True)
        except PermissionError:
            pass  # alive, owned by someone else
