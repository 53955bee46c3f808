"""The shapes world's vocabulary and scenes: shapes, colours, sizes, the 3x3 grid of positions,
random scenes, their checks, and the renderer that draws them."""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple")
SIZES = ("small", "large")
# Row-major over the 3x3 grid: POSITIONS[3 * row + col].
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
ANSWER_TYPES = ("colour", "shape", "size", "position", "count")
# Questions whose answer may be "no" or "nothing": the model must learn to say what is not there.
EXTRA_ANSWER_TYPES = ("existence", "absent", "relation")
# Questions about two pictures at once ("Which picture has more circles?" -> "the first", "the
# second" or "neither"; "Do both pictures hold a red shape?" -> "yes" / "no"): records with two
# pictures, one <image> tag each. Off by default: the default world stays as it was.
TWO_PICTURES = "two_pictures"
TWO_PICTURE_ANSWERS = ("the first", "the second", "neither")
# Grid relations, by (row, column) of the 3x3 grid: "left of" means in a column further left,
# whatever the row; "above" means in a row higher up, whatever the column.
RELATIONS = ("left of", "right of", "above", "below")

# Far apart in RGB so even a small encoder separates them; no anti-aliasing, so these exact
# values are the pixels inside each object.
COLOUR_RGB = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 200, 30),
    "purple": (150, 60, 190),
}
BACKGROUND_RGB = (250, 250, 250)
# Width and height of the object's box at 224 px. Both exceed one 32-px patch; a large
# object still fits inside its ~74-px cell with a few pixels to spare.
SIZE_PIXELS = {"small": 42, "large": 64}
REFERENCE_IMAGE_SIZE = 224
CELL_MARGIN = 2  # pixels kept free at each cell border, so neighbours never touch
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PLURAL_SHAPES = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
SINGULAR = {plural: shape for shape, plural in PLURAL_SHAPES.items()}


# ----------------------------------------------------------------------------- scenes


def max_offset(size: str) -> int:
    """How far (pixels at 224) an object of this size may move from its cell centre."""
    cell = REFERENCE_IMAGE_SIZE / 3
    return int((cell - SIZE_PIXELS[size]) // 2) - CELL_MARGIN


def random_scene(rng: random.Random, min_objects: int = 1, max_objects: int = 3) -> list[dict]:
    """1..3 objects in distinct grid cells, listed in reading order (top left to bottom right)."""
    n = rng.randint(min_objects, max_objects)
    cells = sorted(rng.sample(range(len(POSITIONS)), n))
    scene = []
    for cell in cells:
        size = rng.choice(SIZES)
        m = max_offset(size)
        scene.append({
            "shape": rng.choice(SHAPES),
            "colour": rng.choice(COLOURS),
            "size": size,
            "position": POSITIONS[cell],
            "offset": [rng.randint(-m, m), rng.randint(-m, m)],  # jitter (dx, dy), pixels at 224
        })
    return scene


def scene_key(scene: list[dict], image_size: int = REFERENCE_IMAGE_SIZE) -> tuple:
    """Everything that decides the pixels: equal keys give identical images, and so do equal pictures.

    The drawn box, not the offset: offsets that the cell's margin clamps to the same place draw
    the same picture, and must count as the same picture.
    """
    return tuple(sorted((o["shape"], o["colour"], o["position"], object_box(o, image_size)) for o in scene))


def validate_scene(scene: list[dict], where: str = "scene") -> None:
    if not isinstance(scene, list) or not scene:
        raise ValueError(f"{where}: expected a non-empty list of objects, got {scene!r}")
    seen = set()
    for i, o in enumerate(scene):
        for field, allowed in (("shape", SHAPES), ("colour", COLOURS), ("size", SIZES), ("position", POSITIONS)):
            if o.get(field) not in allowed:
                raise ValueError(f"{where}[{i}].{field}: expected one of {allowed}, got {o.get(field)!r}")
        if o["position"] in seen:
            raise ValueError(f"{where}[{i}]: two objects share the position {o['position']!r}")
        seen.add(o["position"])


def object_box(obj: dict, image_size: int = 224) -> tuple[int, int, int, int]:
    """Inclusive pixel box (x0, y0, x1, y1) of one object, kept inside its grid cell."""
    row, col = divmod(POSITIONS.index(obj["position"]), 3)
    scale = image_size / REFERENCE_IMAGE_SIZE
    cx0, cx1 = round(col * image_size / 3), round((col + 1) * image_size / 3) - 1
    cy0, cy1 = round(row * image_size / 3), round((row + 1) * image_size / 3) - 1
    side = round(SIZE_PIXELS[obj["size"]] * scale)
    dx, dy = obj.get("offset", (0, 0))
    x0 = round((cx0 + cx1 + 1) / 2 + dx * scale - side / 2)
    y0 = round((cy0 + cy1 + 1) / 2 + dy * scale - side / 2)
    # Rounding at other image sizes may push a pixel over the margin; clamp into the cell.
    margin = max(1, round(CELL_MARGIN * scale))
    x0 = min(max(x0, cx0 + margin), cx1 - margin - side + 1)
    y0 = min(max(y0, cy0 + margin), cy1 - margin - side + 1)
    return x0, y0, x0 + side - 1, y0 + side - 1


def render_scene(scene: list[dict], image_size: int = 224) -> Image.Image:
    """Draw the scene: filled, unsmoothed shapes in their exact colours on a near-white ground."""
    img = Image.new("RGB", (image_size, image_size), BACKGROUND_RGB)
    draw = ImageDraw.Draw(img)
    for obj in scene:
        x0, y0, x1, y1 = object_box(obj, image_size)
        fill = COLOUR_RGB[obj["colour"]]
        shape = obj["shape"]
        if shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif shape == "triangle":  # pointing up, base on the box's bottom edge
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
        elif shape == "cross":  # a plus sign whose arms are a third of the box wide
            side = x1 - x0 + 1
            arm = round(side / 3)
            a0 = x0 + (side - arm) // 2
            b0 = y0 + (side - arm) // 2
            draw.rectangle((x0, b0, x1, b0 + arm - 1), fill=fill)
            draw.rectangle((a0, y0, a0 + arm - 1, y1), fill=fill)
        else:
            raise ValueError(f"render_scene: unknown shape {shape!r}; expected one of {SHAPES}")
    return img


# ----------------------------------------------------------------------------- language


def position_phrase(position: str) -> str:
    """'top left' -> 'in the top left', 'top' -> 'at the top', 'left' -> 'on the left'."""
    if position in ("top", "bottom"):
        return f"at the {position}"
    if position in ("left", "right"):
        return f"on the {position}"
    return f"in the {position}"


def describe_object(obj: dict) -> str:
    """'large red circle'"""
    return f"{obj['size']} {obj['colour']} {obj['shape']}"
