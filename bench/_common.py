"""What the bench scripts share: stand-in images and the closing markdown table."""

import random

from PIL import Image, ImageDraw


def random_image(rng: random.Random, size: int) -> Image.Image:
    """A few coloured discs on a light background: content does not change throughput."""
    img = Image.new("RGB", (size, size), (245, 245, 240))
    draw = ImageDraw.Draw(img)
    margin = size // 5
    for _ in range(rng.randint(1, 4)):
        x, y = rng.randint(margin, size - margin), rng.randint(margin, size - margin)
        r = rng.randint(max(2, size // 20), max(3, size // 8))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(rng.randint(0, 255) for _ in range(3)))
    return img


def print_table(rows: list[dict], columns: list[tuple[str, str]]) -> None:
    """Rows as a markdown table; ``columns`` are (header, key) pairs; a missing value prints '-'."""
    print("\n| " + " | ".join(h for h, _ in columns) + " |\n|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join(str(r[k]) if r.get(k) is not None else r.get("error", "-") for _, k in columns) + " |")
