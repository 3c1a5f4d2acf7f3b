"""Shared fixtures: tiny tokenizers, images, datasets and shards made on the fly."""
from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CAPTION_WORDS = ["Một", "một", "hai", "ba", "hình_tròn", "hình_vuông", "tam_giác", "màu", "đỏ",
                 "xanh_lá", "xanh_dương", "vàng", "ở", "góc", "trên", "dưới", "bên", "trái",
                 "phải", "giữa", "người", "đàn_ông", "đang", "làm_việc", "Hà_Nội", "con", "chó",
                 "chạy", "trên", "bãi", "cỏ", "xe", "hơi", "đậu", "trước", "ngôi", "nhà"]


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A PhoBERT-format tokenizer (vocab.txt + bpe.codes) over a small Vietnamese vocabulary."""
    from phoclip.text import build_phobert_tokenizer

    d = tmp_path_factory.mktemp("tok")
    return build_phobert_tokenizer([" ".join(CAPTION_WORDS)], d)


def make_image(path: Path, seed: int, size=(48, 40), mode="RGB", fmt=None) -> Path:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    im = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        im = im.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format=fmt)
    return path


def random_caption(rng: random.Random) -> str:
    return " ".join(w.replace("_", " ") for w in rng.sample(CAPTION_WORDS, 5))


@pytest.fixture()
def coco_dataset(tmp_path) -> tuple[Path, Path, dict]:
    """A coco-jsonl source of 24 images with 2 captions each."""
    img_dir = tmp_path / "images"
    rng = random.Random(0)
    caps = {}
    with open(tmp_path / "train.jsonl", "w", encoding="utf-8") as f:
        for i in range(24):
            name = f"img{i:03d}.jpg"
            make_image(img_dir / name, i)
            caps[name] = [random_caption(rng), random_caption(rng)]
            for c in caps[name]:
                f.write(json.dumps({"image": name, "caption": c}, ensure_ascii=False) + "\n")
    return tmp_path / "train.jsonl", img_dir, caps


def run_make_shards(args: list[str]) -> int:
    from sharding.make_shards import main

    return main([str(a) for a in args])


@pytest.fixture()
def make_shards():
    return run_make_shards
