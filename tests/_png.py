"""Reading a PNG a test gets back: that it decodes, its size, and what is drawn on it."""

import io
from pathlib import Path

import numpy as np


def pixels(png: bytes | Path) -> np.ndarray:
    """The PNG's pixels, RGB, shape (height, width, 3); fails unless ``png`` is a PNG that decodes."""
    from PIL import Image

    data = png.read_bytes() if isinstance(png, Path) else png
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG", im.format
        return np.asarray(im.convert("RGB"))


def drawn(rgb: np.ndarray, colour, tolerance: int = 0) -> int:
    """How many pixels have ``colour`` (an RGB triple or a matplotlib colour: "tab:blue", "C1"), each
    channel within ``tolerance`` (a thin anti-aliased line may have no pixel of exactly its colour)."""
    if isinstance(colour, str):
        from matplotlib.colors import to_rgb

        colour = tuple(round(255 * c) for c in to_rgb(colour))
    return int((np.abs(rgb.astype(int) - np.array(colour)).max(axis=-1) <= tolerance).sum())
