"""The picture `scan-deploy explain --png` writes: for each word of the caption, the image's
regions lit by that word's attention (brightness = the summed weight of the boxes over a pixel,
on one scale for all words, so a word that attends everywhere stays dim), as in the SCAN
paper's figures, and a word × region heat map of the weights. Without boxes, the regions are
laid out as a grid of cells. With the image file, each panel is the image itself, lit by the
word's attention (dimmed to a fifth where it has none).

matplotlib (the `plots` extra) draws the figure; the brightness maps are plain numpy
(`attention_map`), so what a panel shows is testable without rendering.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from scan_deploy.atomic import atomic_path
from scan_deploy.errors import input_error

PANEL_WIDTH = 240  # pixels of a word's brightness map across
MAX_PANELS = 12  # words drawn; the heat map shows them all


def grid_boxes(regions: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Boxes (regions, 4) of a square-ish grid of unit cells, and its size, for regions whose
    boxes are not known."""
    columns = math.ceil(math.sqrt(regions))
    rows = math.ceil(regions / columns)
    k = np.arange(regions)
    x, y = (k % columns).astype(np.float32), (k // columns).astype(np.float32)
    return np.stack([x, y, x + 1, y + 1], axis=1), (columns, rows)


def attention_map(
    boxes: np.ndarray, weights: np.ndarray, size: tuple[int, int], width: int = PANEL_WIDTH
) -> np.ndarray:
    """(height, width): each pixel the sum of the weights of the boxes covering it (an image
    `size` = (W, H) scaled to `width` pixels across)."""
    image_w, image_h = size
    height = max(1, round(width * image_h / image_w))
    scale_x, scale_y = width / image_w, height / image_h
    light = np.zeros((height, width), np.float64)
    for (x1, y1, x2, y2), weight in zip(boxes, weights, strict=True):
        left, right = int(np.floor(x1 * scale_x)), int(np.ceil(x2 * scale_x))
        top, bottom = int(np.floor(y1 * scale_y)), int(np.ceil(y2 * scale_y))
        light[max(top, 0) : max(bottom, 0), max(left, 0) : max(right, 0)] += weight
    return light.astype(np.float32)


def load_picture(path: Path, size: tuple[int, int]) -> np.ndarray:
    """The image file as (H, W, 3) uint8 at `size` = (W, H), the size its boxes are in; a file
    Pillow cannot read is a UserError naming it."""
    from PIL import Image, UnidentifiedImageError  # the `plots` extra

    try:
        with Image.open(path) as picture:
            return np.asarray(picture.convert("RGB").resize(size))
    except (UnidentifiedImageError, OSError) as exc:
        raise input_error(path, None, f"not an image Pillow can read ({exc})") from None


def write_hit_png(
    path: Path, text: str, image_id: str, explanation, boxed, image: str | None
) -> None:
    """The attention picture of a text and a gallery image: `boxed` is the image's (boxes,
    size) already cut to the explanation's regions (`Explanation.boxes`), `image` its file;
    without the boxes, a grid."""
    boxes, size = boxed if boxed is not None else (None, None)
    picture = None if boxed is None or image is None else load_picture(Path(image), size)
    title = f"{text!r} → image {image_id}: similarity {explanation.similarity:.4f}"
    title += f" ({explanation.direction})"
    write_explain_png(path, explanation.tokens, explanation.weights, title, boxes, size, picture)


def write_explain_png(
    path: Path,
    tokens: list[str],
    weights: np.ndarray,
    title: str,
    boxes: np.ndarray | None = None,
    size: tuple[int, int] | None = None,
    picture: np.ndarray | None = None,
) -> None:
    """One panel per word (`<start>`/`<end>` left out, at most MAX_PANELS) and the heat map,
    written to `path` whole (a temp file renamed). `picture`: the image (`load_picture`) the
    boxes are in."""
    import matplotlib  # the `plots` extra (the command line names it when it is missing)

    matplotlib.use("Agg")
    from matplotlib import pyplot

    if boxes is None or size is None:
        boxes, size = grid_boxes(weights.shape[1])
    shown = [i for i, t in enumerate(tokens) if t not in ("<start>", "<end>")][:MAX_PANELS]
    columns = min(4, max(1, len(shown)))
    rows = math.ceil(len(shown) / columns) + 1
    maps = [attention_map(boxes, weights[token], size) for token in shown]
    peak = max((float(m.max()) for m in maps), default=0.0) or 1.0
    figure = pyplot.figure(figsize=(3 * columns, 2.6 * rows), dpi=100)
    backdrop = None
    if picture is not None:
        height, width = maps[0].shape if maps else (1, 1)
        backdrop = _resized(picture, (width, height)).astype(np.float32) / 255
    for slot, (token, light) in enumerate(zip(shown, maps, strict=True)):
        axes = figure.add_subplot(rows, columns, slot + 1)
        if backdrop is None:
            axes.imshow(light, cmap="gray", vmin=0, vmax=peak)
        else:
            axes.imshow(backdrop * (0.2 + 0.8 * light / peak)[..., None])
        top = int(np.argmax(weights[token]))
        axes.set_title(f"{tokens[token]} (region {top}: {weights[token, top]:.2f})", fontsize=9)
        axes.set_axis_off()
    heat = figure.add_subplot(rows, 1, rows)
    heat.imshow(weights, aspect="auto", cmap="viridis")
    heat.set_yticks(range(len(tokens)), tokens, fontsize=7)
    heat.set_xlabel("region")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        figure.savefig(tmp, format="png")
    pyplot.close(figure)


def _resized(picture: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(picture).resize(size))
