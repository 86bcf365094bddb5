"""Boxes and pictures of the synthetic benchmark's images, from the same scenes as its features.

Every region of a synthetic image has a centre on the unit square (`Scenes.pos`): a whole object
sits in its cell of the 3x3 grid, a partial crop near its object, background anywhere. Its box,
in pixels of an IMAGE_SIZE image, is drawn around that centre: a whole object fills most of its
cell, a crop a part of that (its visibility), background a fixed share of the image. Nothing is
drawn from the data set's random streams, so its features and captions do not change.

`render_image` draws an image as the scene it was sampled from: the background in the scene's
tint, each whole object a rectangle in its colour (grey without one) with its name written in
it, where its box is. So `scan-deploy explain --png` on a synthetic image shows whether the word
for an object lights up that object. Pillow (the `plots` extra) draws them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

IMAGE_SIZE = (320, 240)  # (width, height) of every synthetic image
OBJECT_HALF = 0.5 / 3 * 0.85  # half a whole object's box, in image units: most of its cell
BACKGROUND_HALF = 0.2
COLOUR_RGB = {
    "red": (200, 40, 40),
    "blue": (50, 80, 210),
    "green": (40, 160, 60),
    "yellow": (230, 210, 40),
    "black": (30, 30, 30),
    "white": (245, 245, 245),
    "orange": (240, 140, 30),
    "brown": (130, 80, 40),
    "gray": (128, 128, 128),
    "pink": (240, 150, 190),
    "purple": (130, 60, 170),
    "silver": (190, 190, 200),
    "golden": (210, 170, 50),
}
NO_COLOUR = (150, 150, 150)


def region_boxes(
    pos: np.ndarray, kind: np.ndarray, visibility: np.ndarray, num_categories: int
) -> np.ndarray:
    """(N, R, 4) float32 boxes (x1, y1, x2, y2) in pixels of IMAGE_SIZE, clipped to the image."""
    half = np.where(kind < num_categories, OBJECT_HALF * np.sqrt(visibility), BACKGROUND_HALF)
    unit = np.concatenate([pos - half[..., None], pos + half[..., None]], axis=-1)
    width, height = IMAGE_SIZE
    scale = np.array([width, height, width, height], np.float32)
    return (np.clip(unit, 0.0, 1.0) * scale).astype(np.float32)


def render_image(
    path: Path,
    boxes: np.ndarray,
    objects: Sequence[tuple[int, str, str | None]],
    tint: tuple[int, int, int],
) -> None:
    """Draw one image: `objects` are (region, name, colour word or None) of its whole objects,
    each drawn in its region's box."""
    from PIL import Image, ImageDraw  # the `plots` extra

    picture = Image.new("RGB", IMAGE_SIZE, tint)
    draw = ImageDraw.Draw(picture)
    fills = [COLOUR_RGB.get(colour, NO_COLOUR) if colour else NO_COLOUR for _, _, colour in objects]
    for (region, _, _), fill in zip(objects, fills, strict=True):
        draw.rectangle(tuple(float(v) for v in boxes[region]), fill=fill, outline=(0, 0, 0))
    for (region, name, _), fill in zip(objects, fills, strict=True):  # names over every box
        x1, y1 = (float(v) for v in boxes[region][:2])
        ink = (255, 255, 255) if sum(fill) < 380 else (0, 0, 0)
        draw.text((x1 + 3, y1 + 3), name, fill=ink, stroke_width=1, stroke_fill=fill)
    picture.save(path, format="PNG", optimize=True)


def scene_tint(scene: int) -> tuple[int, int, int]:
    """A light background colour per scene type."""
    rng = np.random.default_rng([20180718, scene])  # fixed: the same tint in every data set
    return tuple(int(v) for v in rng.integers(200, 250, 3))
