"""Recall on hand-made similarity matrices with known answers."""
import pytest
import torch

from phoclip.retrieval import chance_recall, retrieval_metrics


def test_recall_known_answers_with_several_captions_per_image():
    # 3 images (one-hot), 5 captions: captions 0,1 -> image 0; 2 -> image 1; 3,4 -> image 2
    img = torch.eye(3, 4)
    t2i = torch.tensor([0, 0, 1, 2, 2])
    txt = torch.tensor([
        [1.0, 0.0, 0.0, 0],   # caption 0: its image ranks 1st
        [0.0, 0.9, 0.5, 0],   # caption 1 (image 0): ranks 3rd (image 1 .9, image 2 .5, image 0 0)
        [0.2, 0.8, 0.0, 0],   # caption 2 (image 1): 1st
        [0.5, 0.0, 0.4, 0],   # caption 3 (image 2): 2nd
        [0.0, 0.0, 0.0, 1],   # caption 4 (image 2): all tie at 0 -> ties count in favour: 1st
    ])
    r = retrieval_metrics(img, txt, t2i)
    # t2i ranks (0-based): [0, 2, 0, 1, 0]
    assert r["t2i_R@1"] == 60.0 and r["t2i_R@5"] == 100.0
    assert r["t2i_mean_rank"] == (1 + 3 + 1 + 2 + 1) / 5
    assert r["t2i_median_rank"] == 1
    # i2t: image 0 scores captions [1, 0, .2, .5, 0]: its best own caption (0) is 1st
    #      image 1 scores [0, .9, .8, 0, 0]: own caption 2 (.8) is beaten by caption 1 -> rank 2
    #      image 2 scores [0, .5, 0, .4, 0]: own best .4 beaten by caption 1 (.5) -> rank 2
    assert r["i2t_R@1"] == pytest.approx(100 / 3)
    assert r["i2t_R@5"] == 100.0
    assert r["i2t_mean_rank"] == (1 + 2 + 2) / 3
    assert r["n_images"] == 3 and r["n_captions"] == 5


def test_chunked_equals_unchunked_and_chance():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=-1)
    t2i = torch.arange(50).repeat_interleave(2)
    txt = torch.nn.functional.normalize(img[t2i] + 0.8 * torch.randn(100, 8, generator=g), dim=-1)
    a = retrieval_metrics(img, txt, t2i, chunk=7)
    b = retrieval_metrics(img, txt, t2i, chunk=10_000)
    assert a == b
    assert a["t2i_R@1"] > chance_recall(50, 1)
    assert chance_recall(50, 5) == 10.0
