"""The built-in demo dataset: scenes of coloured shapes with Vietnamese captions.

Generated from a seed (no downloads) and written in a published format
(Flickr8k-vi `captions_vi.txt`), so the demo goes through the real readers. Learnable
in minutes on 2 CPU cores: what a caption says (shape, colour, position, count) is
what the picture shows, with several phrasings per image."""
from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = {"circle": "hình tròn", "square": "hình vuông", "triangle": "hình tam giác"}
COLOURS = {"red": ("đỏ", (220, 40, 40)), "green": ("xanh lá", (40, 170, 60)),
           "blue": ("xanh dương", (40, 80, 220)), "yellow": ("vàng", (235, 200, 30))}
POSITIONS = {"tl": "góc trên bên trái", "tr": "góc trên bên phải", "bl": "góc dưới bên trái",
             "br": "góc dưới bên phải", "c": "giữa bức ảnh"}
COUNTS = {1: "một", 2: "hai", 3: "ba"}
TEMPLATES = [
    "{n} {shape} màu {colour} ở {pos}",
    "{shape} {colour} nằm ở {pos}" ,
    "có {n} {shape} màu {colour} tại {pos}",
    "bức ảnh có {n} {shape} {colour} ở {pos}",
    "ở {pos} là {n} {shape} màu {colour}",
]


def _centre(pos: str, size: int, rng: random.Random) -> tuple[int, int]:
    q = size // 4
    base = {"tl": (q, q), "tr": (3 * q, q), "bl": (q, 3 * q), "br": (3 * q, 3 * q),
            "c": (2 * q, 2 * q)}[pos]
    j = size // 16
    return base[0] + rng.randint(-j, j), base[1] + rng.randint(-j, j)


def draw_scene(shape: str, colour: str, pos: str, count: int, size: int,
               rng: random.Random) -> Image.Image:
    bg = tuple(rng.randint(200, 255) for _ in range(3))
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    cx, cy = _centre(pos, size, rng)
    r = rng.randint(size // 14, size // 9)
    rgb = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in COLOURS[colour][1])
    offsets = [(0, 0), (-r, r // 2), (r, -r // 2)][:count]
    for dx, dy in offsets:
        x, y = cx + dx, cy + dy
        box = [x - r, y - r, x + r, y + r]
        if shape == "circle":
            d.ellipse(box, fill=rgb)
        elif shape == "square":
            d.rectangle(box, fill=rgb)
        else:
            d.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=rgb)
    return im


def make_dataset(out_dir: str | Path, n_images: int = 1200, size: int = 96, seed: int = 0,
                 captions_per_image: int = 3) -> Path:
    """Write images/ and captions_vi.txt (IMAGE#i<TAB>caption); returns the captions file."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = []
    for i in range(n_images):
        shape, colour = rng.choice(list(SHAPES)), rng.choice(list(COLOURS))
        pos, count = rng.choice(list(POSITIONS)), rng.choice([1, 1, 2, 3])
        name = f"scene_{i:05d}.jpg"
        draw_scene(shape, colour, pos, count, size, rng).save(out / "images" / name, quality=92)
        for k, tpl in enumerate(rng.sample(TEMPLATES, captions_per_image)):
            cap = tpl.format(n=COUNTS[count], shape=SHAPES[shape], colour=COLOURS[colour][0],
                             pos=POSITIONS[pos])
            lines.append(f"{name}#{k}\t{cap[0].upper() + cap[1:]}")
    f = out / "captions_vi.txt"
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return f
