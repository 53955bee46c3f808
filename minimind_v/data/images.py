"""Load any image file as an RGB PIL image, with errors that name the file.

The vision encoder wants 3-channel 8-bit RGB. Real image folders hold everything else too:
greyscale scans, PNGs with alpha, palette GIFs, CMYK JPEGs from print workflows, 16-bit
greys from scientific cameras, and the odd truncated download. `load_image` turns every one
of them into RGB, or fails with an `ImageError` that says which file and what was wrong.

Two deliberate choices:
- Transparent pixels are composited on white (what a viewer shows on a page), not black.
- EXIF orientation is NOT applied: pixels are used in stored order, as the CLIP and LLaVA
  pipelines (and the COCO annotations) do, so cached features match theirs.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# File endings treated as images when a whole folder is listed.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# Modes whose pixels carry transparency that must be flattened onto a background.
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


class ImageError(ValueError):
    """An image file that cannot be used: missing, unreadable, truncated, not an image, too large."""


# How large a picture may be: PIL warns above `PIL.Image.MAX_IMAGE_PIXELS` (89M pixels by default)
# and refuses above twice that, to stop "decompression bombs" (a tiny file that expands to
# gigabytes). A real 100-megapixel photo is fine for us, so the warning is silenced and pictures
# decode up to PIL's hard limit (about 179M pixels, ~540 MB as RGB). Beyond it `load_image` raises
# an `ImageError` that says how to raise the limit (`PIL.Image.MAX_IMAGE_PIXELS = ...`).


def load_image(path: str | os.PathLike) -> Image.Image:
    """Read an image file and return it as an RGB PIL image (any mode, any size up to the limit)."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # Large-but-legal images: decoded on purpose (see the note above).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
        try:
            image.load()  # Image.open is lazy: truncation shows up only when pixels are decoded
            rgb = to_rgb(image)
            if rgb is image and getattr(image, "n_frames", 1) > 1:
                rgb = image.copy()  # keep the first frame, let the multi-frame file be closed
        except BaseException:
            image.close()
            raise
        if rgb is not image:
            image.close()  # (single-frame files are closed by PIL once loaded)
        return rgb
    except ImageError as err:
        raise ImageError(f"{path}: {err}") from None
    except FileNotFoundError:
        raise ImageError(f"{path}: no such image file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a folder, not an image file") from None
    except PermissionError:
        raise ImageError(f"{path}: permission denied while reading the image") from None
    except UnidentifiedImageError:
        # (No excerpt of the file: the path may come from a record, and its bytes are not ours to show.)
        raise ImageError(f"{path}: not an image file PIL can read") from None
    except Image.DecompressionBombError as err:
        raise ImageError(
            f"{path}: too large to decode safely ({err}). If the file is trusted, raise the "
            f"limit with `PIL.Image.MAX_IMAGE_PIXELS = <pixels>` before loading it."
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        # PIL reports truncated or corrupt pixel data as OSError ("image file is truncated"),
        # SyntaxError (broken headers in some plugins), or EOFError.
        raise ImageError(f"{path}: cannot decode the image data, the file is truncated or corrupt ({err})") from None


def decode_picture(data, where: str) -> Image.Image:
    """Encoded picture bytes -> RGB PIL image; ImageError naming ``where`` if they are not a picture."""
    if not isinstance(data, (bytes, bytearray, memoryview)) or not len(data):
        raise ImageError(f"{where}: no picture bytes (got {type(data).__name__})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
        return to_rgb(image)
    except ImageError as err:
        raise ImageError(f"{where}: {err}") from None
    except UnidentifiedImageError:
        raise ImageError(f"{where}: not a picture PIL can read") from None
    except Image.DecompressionBombError as err:
        raise ImageError(f"{where}: too large to decode safely ({err})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageError(f"{where}: cannot decode the picture, the bytes are truncated or corrupt ({err})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert an in-memory PIL image of any mode to 8-bit RGB (returns it unchanged if already RGB)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB", "1") and "transparency" in image.info):
        # (H, W) with alpha -> composite over opaque white -> (H, W, 3)
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        # 16-bit (or 32-bit integer) grey: PIL's convert would clip everything above 255 to
        # white, so rescale the 0..65535 range to 0..255 instead.
        grey = np.asarray(image).astype(np.float32) / 257.0
        return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        # Float grey: values in [0, 1] are scaled to [0, 255]; anything else is taken as 0..255.
        grey = np.asarray(image).astype(np.float32)
        if grey.size and np.nanmin(grey) >= 0.0 and np.nanmax(grey) <= 1.0:
            grey = grey * 255.0
        grey = np.nan_to_num(grey, nan=0.0)
        return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    try:
        return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, HSV, LAB, ...
    except (ValueError, OSError) as err:
        raise ImageError(f"cannot convert an image of mode {mode!r} to RGB ({err})") from None


def list_image_files(folder: str | os.PathLike) -> list[str]:
    """Every image file under `folder` (recursively), as sorted '/'-separated names relative to it.

    Links to files outside `folder` are left out (rglob does not enter linked folders)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"{folder}: no such image folder")
    base = folder.resolve()
    names = [
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
        # a link that leads out of the folder is not one of its images
        and (not path.is_symlink() or base in path.resolve().parents)
    ]
    return sorted(names)

