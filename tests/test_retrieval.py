"""Recall on hand-made similarity matrices with known answers."""
import pytest
import torch

from phoclip.evaluation.retrieval import chance_recall, retrieval_metrics


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


def test_embedding_logs_progress_lines_with_totals_also_without_a_terminal(caplog):
    """A SLURM log shows a tqdm bar as nothing useful: the embedding loop logs
    `done / total images (pct), rate, time left` lines through logging (rate-limited),
    and a final line."""
    import logging

    import phoclip
    from phoclip.evaluation.retrieval import ProgressLog, embed_samples

    torch.manual_seed(0)
    model = phoclip.create_model("tiny-debug", embed_dim=16, text={"hf_config": {"vocab_size": 50}})
    size = model.config["vision"].get("image_size", 224)
    samples = [{"key": str(i), "image": torch.rand(3, size, size), "ids": torch.tensor([[0, 5, 6, 2]])}
               for i in range(6)]
    with caplog.at_level(logging.INFO, logger="phoclip.evaluation.retrieval"):
        img, txt, *_ = embed_samples(model, iter(samples), torch.device("cpu"), batch_size=2, progress=True,
                                     total=6, progress_every_s=0)
    lines = [r.getMessage() for r in caplog.records if r.name == "phoclip.evaluation.retrieval"]
    assert img.shape == (6, 16) and txt.shape == (6, 16)
    assert lines[0].startswith("embedding: 2 / 6 images (33%), ") and " images/s" in lines[0], lines
    assert lines[-1].startswith("embedding: 6 / 6 images (100%)") and lines[-1].endswith("(done)"), lines
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="phoclip.evaluation.retrieval"):
        embed_samples(model, iter(samples), torch.device("cpu"), batch_size=2, progress=False)
        bar = ProgressLog("embedding", None, every_s=3600)
        bar.update(5)  # within the interval: no line; no total: no percentage
        assert "5 images," in bar.line() and "%" not in bar.line()
    assert not caplog.records  # progress off, and rate-limited: nothing logged
