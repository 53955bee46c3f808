"""A disk cache of the frozen encoder's patch tokens: encode every image once, read it ever after.

The CLIP encoder never trains, so the 50 tokens it makes for an image are the same in every
epoch. Encoding them once and memory-mapping the result turns the most expensive part of a
training step into a gather from the page cache.

A cache folder holds:
    meta.json            the commit record: encoder fingerprint, the name of every picture it
                         covers, per-picture file stats, shape, dtype and the features file's name
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
- meta.json is data from disk, not trusted: a field a build would not write is refused as
  stale (:mod:`.feature_cache_meta`); the token file is read with allow_pickle=False.
- With skip_bad_images=True a build encodes the images it can read and records the others
  (`cache.unreadable`: name -> reason); without it the first unreadable image stops the build
  with an error naming the file.
- Pictures stored inside parquet rows (the original's layout) are named `"<file>#<row>/<k>"`
  (picture k of that row of `<file>`, relative to the folder given as image_dir); their staleness
  is the parquet file's size and mtime. `ParquetChatDataset.picture_names()` lists them; meta.json
  lists every picture a cache covers, and `cache.uncovered(names)` names those it lacks.

The meta.json checks are in :mod:`.feature_cache_meta`, what a build reads (names, files, stats,
decoding, and why staleness is a stat) in :mod:`.feature_sources`; the names other modules use are importable from here.
"""

from __future__ import annotations

import os
import socket
import stat
import time
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..runfiles import atomic_write_json, fsync_path, inside
from .feature_cache_meta import (FEATURES_NAME, FORMAT_VERSION, META_FILE, REBUILD, StaleCacheError,  # noqa: F401
                                 check_meta, read_meta_or_none)
from .feature_sources import (FAULT_ENV, DecodedImages, collate_decoded, decoding_workers, fault_point,  # noqa: F401
                              remove_abandoned_partials, source_or_none, source_path, stat_paths, unique_names)
from .images import ImageError, list_image_files
from .parquet_layout import parse_picture_key

# Token dtypes a cache can hold; numpy has no bfloat16.
_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32}


class FeatureCache:
    """Read-only view of a built cache: `cache[name] -> (T, W)`, `cache.get(names) -> (B, T, W)`.

    Make one with `FeatureCache.build`, `FeatureCache.open` or `ensure_cache`. The token file is
    memory-mapped lazily, so a cache can be handed to DataLoader workers cheaply (pickling it
    does not copy the tokens).
    """

    def __init__(self, cache_dir: str | os.PathLike, meta: dict):
        self.cache_dir = Path(cache_dir)
        self.meta = meta
        self.names: list[str] = list(meta["names"])  # every image the build tried, readable or not
        # name -> why it could not be read (builds with skip_bad_images); these have no tokens.
        self.unreadable: dict[str, str] = dict(meta.get("unreadable") or {})
        self.index: dict[str, int] = {
            name: row for row, name in enumerate(self.names) if name not in self.unreadable
        }
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
        skip_bad_images: bool = False,
    ) -> "FeatureCache":
        """Encode `names` (default: every image under image_dir) with `encoder` and store the tokens.

        names are paths relative to image_dir, as in the dataset's "image" fields (duplicates are
        encoded once), or parquet pictures "<file>#<row>/<k>" (file relative to image_dir); one that
        leads outside image_dir is refused. num_workers: processes decoding
        images (None: a few for large builds). skip_bad_images: encode the images that can be read
        and record the others in `cache.unreadable` (name -> reason) instead of stopping at the
        first, with an ImageError naming it. Replaces any cache already in cache_dir, atomically.
        """
        image_dir, cache_dir = Path(image_dir), Path(cache_dir)
        if dtype not in _NUMPY_DTYPES:
            raise ValueError(f"dtype must be torch.float16 or torch.float32, got {dtype}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        names = unique_names(names) if names is not None else list_image_files(image_dir)
        if not names:
            raise ValueError(f"no images to encode: {image_dir} holds no image files and no names were given")
        unreadable: dict[str, str] = {}
        paths: list[Path | None] = []  # the file holding each picture (an image file or a parquet file)
        confined: dict[str, Path] = {}  # parquet file -> its confined path (checked once, not per picture)
        for name in names:  # confine every name before anything is stat'ed or opened
            try:
                paths.append(source_path(image_dir, name, confined))
            except ValueError as err:
                if not skip_bad_images:
                    raise ImageError(f"cannot build the feature cache {cache_dir}: {err}") from None
                unreadable[name] = f"refused, never opened: {err}"
                paths.append(None)
        # Stat before reading: if a file changes during the build, open() will see it as stale.
        stats, missing = stat_paths(paths)
        if missing and not skip_bad_images:
            raise ImageError(
                f"{len(missing)} of {len(names)} images are missing from {image_dir}, e.g. "
                + ", ".join(repr(names[row]) for row in missing[:5])
            )
        for row in missing:
            unreadable[names[row]] = f"{paths[row]}: no such image file"
            paths[row] = None
        if num_workers is None:
            num_workers = decoding_workers(len(names))
        fingerprint = encoder.fingerprint()
        count, tokens, width = len(names), encoder.num_tokens, encoder.width

        cache_dir.mkdir(parents=True, exist_ok=True)
        remove_abandoned_partials(cache_dir)
        features_file = f"features-{uuid.uuid4().hex[:12]}.npy"
        partial = cache_dir / f"{features_file}.{socket.gethostname()}-{os.getpid()}.partial"
        previous = read_meta_or_none(cache_dir)
        started = time.perf_counter()
        committed = False
        try:
            # Rows of unreadable images stay zero; the index never points at them.
            store = np.lib.format.open_memmap(partial, mode="w+", dtype=_NUMPY_DTYPES[dtype],
                                              shape=(count, tokens, width))
            items = [None if path is None else name if parse_picture_key(name) else path
                     for name, path in zip(names, paths)]
            loader = torch.utils.data.DataLoader(
                DecodedImages(items, encoder.pixel_processor, image_dir), batch_size=batch_size, shuffle=False,
                num_workers=num_workers, collate_fn=collate_decoded, pin_memory=encoder.device.type == "cuda",
            )
            with tqdm(total=count, unit="img", desc="encoding images", disable=not progress) as bar:
                start = 0
                for batch_number, (pixel_values, good, problems) in enumerate(loader, 1):
                    for local, problem in problems:
                        name = names[start + local]
                        if name in unreadable:
                            continue  # refused or missing, recorded above
                        if not skip_bad_images:
                            raise ImageError(
                                f"cannot build the feature cache {cache_dir}: image {name!r} in {image_dir}: "
                                f"{problem} (skip_bad_images=True, or --skip-bad-samples, leaves it out)"
                            )
                        unreadable[name] = problem
                    if good:
                        batch = encoder(pixel_values).to(dtype)  # (b, 3, S, S) -> (b, T, W)
                        if not torch.isfinite(batch).all():
                            raise ValueError(
                                f"encoder output for images {names[start + good[0]]!r}.. is not finite in {dtype}; "
                                f"build with dtype=torch.float32"
                            )
                        store[start + np.asarray(good)] = batch.cpu().numpy()
                    size = len(good) + len(problems)
                    start += size
                    bar.update(size)
                    fault_point(f"batch:{batch_number}")
            store.flush()
            del store
            fsync_path(partial)
            os.replace(partial, cache_dir / features_file)
            fault_point("commit")
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
                "image_stats": stats.tolist(),  # [[size_bytes, mtime_ns], ...] per name, -1 if missing
                "unreadable": unreadable,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            atomic_write_json(cache_dir / META_FILE, meta, indent=None)  # the commit point
            committed = True
        finally:
            if not committed:
                for leftover in (partial, cache_dir / features_file):
                    leftover.unlink(missing_ok=True)
        # The replaced token file. Its name comes from the old meta.json: only a name of the exact
        # form this builder writes is removed, so it is a file directly in cache_dir (a link
        # there is removed itself, never what it points to).
        old_file = previous.get("features_file") if previous is not None else None
        if isinstance(old_file, str) and FEATURES_NAME.fullmatch(old_file) and old_file != features_file:
            try:
                (cache_dir / old_file).unlink(missing_ok=True)
            except OSError:
                pass  # e.g. a folder of that name: not ours to remove
        seconds = time.perf_counter() - started
        cache = cls(cache_dir, meta)
        if progress:
            megabytes = (cache_dir / features_file).stat().st_size / 1e6
            skipped = f", {len(unreadable)} unreadable images left out" if unreadable else ""
            print(
                f"feature cache: {count} images -> {cache_dir} ({count}x{tokens}x{width} {meta['dtype']}, "
                f"{megabytes:.1f} MB) in {seconds:.1f} s, {count / max(seconds, 1e-9):.1f} images/s{skipped}"
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

        With image_dir, also refuse it if any cached image file changed or disappeared. A
        meta.json that is not what a build writes (a name reaching outside the folder, a field
        of the wrong kind) is refused as stale too, naming the field.
        """
        cache_dir = Path(cache_dir)
        meta = read_meta_or_none(cache_dir)
        if meta is None:
            raise StaleCacheError(
                f"no complete feature cache in {cache_dir} (missing or unreadable {META_FILE}; "
                f"an interrupted build leaves none): {REBUILD}"
            )
        check_meta(cache_dir, meta)
        expected = (
            encoder_or_fingerprint if isinstance(encoder_or_fingerprint, str) else encoder_or_fingerprint.fingerprint()
        )
        if meta["fingerprint"] != expected:
            raise StaleCacheError(
                f"feature cache {cache_dir} was built by encoder {meta['fingerprint']} ({meta.get('encoder')!r}), "
                f"not by this encoder ({expected}): other weights or preprocessing give other tokens; {REBUILD}"
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
        # Names were checked by check_meta (relative, no '..'); one refused at build time (a link
        # out) stays unstated, as then, so that it does not look changed on every open.
        confined: dict[str, Path] = {}
        paths = [source_or_none(image_dir, name, confined) for name in self.names]
        current, _ = stat_paths(paths)  # (N, 2), -1 where missing
        changed = np.flatnonzero((current != recorded).any(axis=1))
        if len(changed):
            gone = [self.names[i] for i in changed if current[i, 0] < 0]
            examples = ", ".join(repr(self.names[i]) for i in changed[:3])
            raise StaleCacheError(
                f"feature cache {self.cache_dir} is stale: {len(changed)} of {len(self.names)} images in "
                f"{image_dir} changed since it was built ({len(gone)} missing), e.g. {examples}; {REBUILD}"
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
            name = err.args[0]
            if name in self.unreadable:
                raise KeyError(f"image {name!r} has no tokens in the feature cache {self.cache_dir}: it could "
                               f"not be read when the cache was built ({self.unreadable[name]})") from None
            raise KeyError(
                f"image {name!r} is not in the feature cache {self.cache_dir} "
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

    def uncovered(self, names: Sequence[str]) -> list[str]:
        """The names among ``names`` that meta.json does not list (never encoded, not even tried),
        each once: checks a cache against the data it serves, e.g. a parquet dataset's picture_names()."""
        listed = set(self.names)
        return [name for name in unique_names(names) if name not in listed]

    def __contains__(self, name: str) -> bool:
        """Whether the cache holds tokens for image `name` (False for unreadable ones)."""
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
        name = self.meta["features_file"]  # checked by check_meta: features-<12 hex>.npy
        try:
            path = inside(self.cache_dir, name, "features_file")
        except ValueError as err:
            raise StaleCacheError(f"feature cache {self.cache_dir}: meta.json field 'features_file': {err}; "
                                  f"refused, {REBUILD}") from None
        expected = (len(self.names), self.num_tokens, self.width)
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or device would block or lie
                raise OSError("not a regular file")
            # allow_pickle=False: an object array in the file is refused, never unpickled.
            features = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise StaleCacheError(f"feature cache {self.cache_dir}: cannot read {name} ({err}); rebuild it") from None
        if not isinstance(features, np.ndarray) or features.shape != expected \
                or features.dtype != np.dtype(self.meta["dtype"]):
            raise StaleCacheError(
                f"feature cache {self.cache_dir}: {name} holds {getattr(features, 'shape', '?')} "
                f"{getattr(features, 'dtype', '?')}, meta.json says {expected} {self.meta['dtype']}; rebuild it"
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
    skip_bad_images: bool = False,
) -> FeatureCache:
    """Open the cache in cache_dir if it is valid for this encoder, these images and names; else build it.

    skip_bad_images: as in FeatureCache.build; without it, a cache that left out any of the
    wanted images is rebuilt, so the build names the file that cannot be read.
    In multi-process training, call it on one process first (the build is not shared), then open.
    """
    fingerprint = encoder.fingerprint()
    wanted = unique_names(names) if names is not None else list_image_files(image_dir)
    try:
        cache = FeatureCache.open(cache_dir, fingerprint, image_dir=image_dir)
        missing = cache.uncovered(wanted)
        unreadable = [] if skip_bad_images else [name for name in wanted if name in cache.unreadable]
        if not missing and not unreadable and cache.dtype == dtype:
            return cache
        if missing:
            reason = f"{len(missing)} requested images are not in it, e.g. {missing[0]!r}"
        elif unreadable:
            reason = f"{len(unreadable)} requested images were left out as unreadable, e.g. {unreadable[0]!r}"
        else:
            reason = f"it holds {cache.dtype}, {dtype} was asked"
    except StaleCacheError as err:
        reason = str(err)
    if progress:
        print(f"building the feature cache: {reason}")
    return FeatureCache.build(
        encoder, image_dir, cache_dir, names=wanted, batch_size=batch_size, dtype=dtype,
        progress=progress, num_workers=num_workers, skip_bad_images=skip_bad_images,
    )


