"""Image preprocessing, one owner for training, evaluation, search and serving:
the training crop (`random_crop_box`, `image_to_tensor`, or its device-side twin
`pad_images` + `resize_on_device`), the evaluation resize + center crop, and the
ImageNet normalisation (`normalize_images`, on whatever device the pixels are)."""
from __future__ import annotations

import math
import random
from typing import Optional

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_NORM: dict = {}  # (device) -> (mean, std) of 0-255 pixels, made once per device


def normalize_images(x: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """uint8 pixels [..., 3, H, W] → ImageNet-normalised floats (in `dtype`, default
    float32), on whatever device `x` is: the training stream ships uint8 (4x fewer bytes
    through the DataLoader and host→device) and the trainer normalises on the GPU."""
    if x.dtype != torch.uint8:
        raise TypeError(f"normalize_images wants uint8 pixels, got {x.dtype}")
    if x.device not in _NORM:
        _NORM[x.device] = tuple(torch.tensor(v, dtype=torch.float32).mul_(255).view(3, 1, 1).to(x.device)
                                for v in (IMAGENET_MEAN, IMAGENET_STD))
    mean, std = _NORM[x.device]
    y = x.float().sub_(mean).div_(std)
    return y if dtype is None else y.to(dtype)


def random_crop_box(image_size: tuple[int, int], rng: random.Random,
                    scale: tuple[float, float] = (0.8, 1.0)) -> tuple[int, int, int, int]:
    """The training crop of an image of (w, h): (top, left, height, width), random
    resized crop (area scale 0.8-1, ratio 3/4-4/3; center square after 10 misses)."""
    w, h = image_size
    area = w * h
    for _ in range(10):
        a = area * rng.uniform(*scale)
        r = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = int(round(math.sqrt(a * r))), int(round(math.sqrt(a / r)))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
            return top, left, ch, cw
    cw = ch = min(w, h)
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def image_to_tensor(img, size: int, train: bool, rng: Optional[random.Random] = None,
                    scale: tuple[float, float] = (0.8, 1.0), normalize: bool = True) -> torch.Tensor:
    """train: random resized crop (`random_crop_box`; no flip, since captions say left
    and right), antialiased bilinear; eval: resize shorter side + center crop.
    Normalised float [3, size, size], or the uint8 pixels with normalize=False."""
    import torchvision.transforms.functional as TF

    if train:
        top, left, ch, cw = random_crop_box(img.size, rng or random.Random(), scale)
        img = TF.resized_crop(img, top, left, ch, cw, [size, size], antialias=True)
    else:
        img = TF.center_crop(TF.resize(img, size, antialias=True), [size, size])
    x = TF.pil_to_tensor(img)
    return normalize_images(x) if normalize else x


def pad_images(images: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """uint8 [3, h, w] images of different sizes → one zero-padded [B, 3, H, W] batch
    (`images`) and each image's (h, w) (`sizes`)."""
    hmax = max(x.shape[1] for x in images)
    wmax = max(x.shape[2] for x in images)
    out = torch.zeros(len(images), 3, hmax, wmax, dtype=torch.uint8)
    for i, x in enumerate(images):
        out[i, :, :x.shape[1], :x.shape[2]] = x
    return {"images": out, "sizes": torch.tensor([x.shape[1:] for x in images], dtype=torch.int32)}


def resize_on_device(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """The training crop done where `images` are (the GPU): each padded uint8 image's box
    (top, left, height, width) resized to size x size, antialiased bilinear (PIL's
    filter, as the workers' `image_to_tensor`; within ~1 grey level of it), uint8."""
    import torch.nn.functional as F

    out = torch.empty(images.shape[0], 3, size, size, dtype=torch.uint8, device=images.device)
    for i, (top, left, h, w) in enumerate(boxes.tolist()):  # boxes: a small host tensor
        crop = images[i:i + 1, :, top:top + h, left:left + w].float()
        y = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[i] = y[0].round_().clamp_(0, 255).to(torch.uint8)
    return out
