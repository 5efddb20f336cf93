"""Make `data/furniture.csv` and its product photos under `data/furniture/`.

The products are invented and the "photos" are drawn with Pillow (nothing downloaded),
the same on every run. A few rows point at `https://` URLs instead of files, to show
that such images pass through as they are (they are placeholders: a real provider
cannot fetch them, so on OpenAI those rows fail with a per-row error).

    python data/make_furniture.py
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

ROWS = 60
REMOTE_ROWS = 3
HERE = Path(__file__).parent
IMAGES = HERE / "furniture"
KINDS = ["chair", "table", "lamp", "sofa", "shelf"]
COLORS = {"walnut brown": (110, 72, 45), "oak": (196, 152, 98), "black": (30, 30, 30),
          "white": (235, 235, 230), "sage green": (140, 165, 130), "navy": (35, 50, 95),
          "terracotta": (200, 100, 70), "grey": (128, 128, 128)}
MATERIALS = ["solid wood", "engineered wood", "steel", "rattan", "velvet", "linen", "bamboo"]
BRANDS = ["Nordhavn", "Casa Lumo", "Birchline", "Oakhurst & Co", "Studio Ferro", "Kivi Home"]
STYLES = ["Mid-Century", "Scandinavian", "Industrial", "Rustic", "Modern", "Boho"]


def draw(kind: str, color: tuple[int, int, int], size: int, seed: int) -> Image.Image:
    """A simple line drawing of the piece on a light background."""
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), (246, 244, 240))
    pen = ImageDraw.Draw(image)
    s = size / 256
    floor = 220 * s
    pen.line([(0, floor), (size, floor)], fill=(200, 196, 190), width=max(1, int(2 * s)))
    if kind == "chair":
        pen.rectangle([80 * s, 130 * s, 170 * s, 145 * s], fill=color)
        pen.rectangle([150 * s, 50 * s, 165 * s, 145 * s], fill=color)
        for x in (85, 155):
            pen.rectangle([x * s, 145 * s, (x + 8) * s, floor], fill=color)
    elif kind == "table":
        pen.rectangle([40 * s, 110 * s, 216 * s, 125 * s], fill=color)
        for x in (50, 198):
            pen.rectangle([x * s, 125 * s, (x + 9) * s, floor], fill=color)
    elif kind == "lamp":
        pen.polygon([(95 * s, 60 * s), (160 * s, 60 * s), (180 * s, 110 * s),
                     (75 * s, 110 * s)], fill=color)
        pen.rectangle([124 * s, 110 * s, 131 * s, 205 * s], fill=(90, 90, 90))
        pen.ellipse([100 * s, 200 * s, 155 * s, floor], fill=(90, 90, 90))
    elif kind == "sofa":
        pen.rounded_rectangle([30 * s, 100 * s, 226 * s, 190 * s], radius=int(18 * s), fill=color)
        pen.rectangle([50 * s, 140 * s, 206 * s, 170 * s], fill=tuple(min(c + 25, 255)
                                                                     for c in color))
        for x in (45, 205):
            pen.rectangle([x * s, 190 * s, (x + 7) * s, floor], fill=(60, 50, 40))
    else:
        pen.rectangle([60 * s, 40 * s, 196 * s, floor], outline=color, width=int(8 * s))
        for y in (90, 140, 185):
            pen.line([(60 * s, y * s), (196 * s, y * s)], fill=color, width=int(6 * s))
        for i in range(rng.randint(2, 5)):
            x = 70 + i * 22
            pen.rectangle([x * s, 60 * s, (x + 12) * s, 86 * s],
                          fill=(rng.randint(60, 220), rng.randint(60, 220), rng.randint(60, 220)))
    return image


def products() -> list[dict[str, object]]:
    rng = random.Random(11)
    IMAGES.mkdir(exist_ok=True)
    rows = []
    for i in range(ROWS):
        kind = KINDS[i % len(KINDS)]
        color_name = rng.choice(list(COLORS))
        asin = f"B0{rng.randint(10**7, 10**8 - 1)}"
        title = f"{rng.choice(STYLES)} {color_name.title()} {kind.title()}"
        if i < REMOTE_ROWS:
            primary = f"https://images.example.com/furniture/{asin}.jpg"
            images = [primary]
        else:
            views = []
            for view in range(1 + i % 2):
                fmt = "jpg" if (i + view) % 3 == 0 else "png"
                path = IMAGES / f"{asin}-{view}.{fmt}"
                draw(kind, COLORS[color_name], 192, seed=i * 10 + view).save(path)
                views.append(path.relative_to(HERE.parent).as_posix())
            primary, images = views[0], views
        rows.append({
            "asin": asin,
            "title": title,
            "brand": rng.choice(BRANDS),
            "price": round(rng.uniform(29, 1299), 2),
            "categories": json.dumps(["Home & Kitchen", "Furniture", kind.title() + "s"]),
            "primary_image": primary,
            "images": json.dumps(images),
            "material": rng.choice(MATERIALS),
            "color": color_name,
        })
    return rows


def main() -> None:
    rows = products()
    target = HERE / "furniture.csv"
    with target.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} products to {target} and their photos to {IMAGES}")


if __name__ == "__main__":
    main()
