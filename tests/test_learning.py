"""A run that has not learned says so in its last lines, and the config the README gives
CPU users learns on a small photo set of their own."""
import json
import math

import pytest

from conftest import read_metrics, train_args, train_main, train_overrides
from phoclip_train.learning import LearningCheck, recall_at_chance


def _val(t2i: float, i2t: float, n: int = 16) -> dict:
    return {"t2i_R@1": t2i, "i2t_R@1": i2t, "n_images": float(n), "n_captions": float(n)}


def test_a_loss_that_has_not_moved_is_named_with_both_numbers(caplog):
    check = LearningCheck()
    for step, loss in ((1, 2.773), (50, 2.79), (100, 2.771)):
        check.saw(step, {"loss": loss})
    with caplog.at_level("WARNING", logger="phoclip_train.learning"):
        msg = check.report(_val(6.25, 6.25))
    assert msg and "loss 2.773 at step 1 and 2.771 at step 100 (not moved" in msg
    assert "R@1 text→image 6.2 image→text 6.2 (chance 6.2 on 16 images, so at chance)" in msg
    assert "small-cpu.yaml" in msg and caplog.records[-1].getMessage() == msg


def test_recall_at_chance_alone_warns():
    check = LearningCheck()
    check.saw(1, {"loss": 3.4})
    check.saw(400, {"loss": 0.4})
    msg = check.report(_val(12.5, 6.25))
    assert msg and "so at chance" in msg and "not moved" not in msg


def test_a_run_that_learned_says_nothing():
    check = LearningCheck()
    check.saw(1, {"loss": 3.4})
    check.saw(5, {"loss": float("nan")})  # a skipped step is not the last loss
    check.saw(400, {"loss": 0.4})
    assert check.report(_val(62.5, 56.2)) is None
    assert LearningCheck().report(None) is None  # nothing read (a resumed run at its end)


def test_chance_depends_on_the_number_of_queries():
    assert recall_at_chance(_val(24.0, 24.0))  # 16 images: within 3 standard errors of 6.2
    assert not recall_at_chance(_val(40.0, 40.0))
    assert not recall_at_chance(_val(24.0, 24.0, n=200))  # 0.5% chance: 24% is far above it
    assert not recall_at_chance({"n_images": 1.0, "t2i_R@1": 100.0, "i2t_R@1": 100.0})


def test_a_run_that_learns_nothing_says_so_in_its_last_lines(shapes_shards, tmp_path):
    run = tmp_path / "run"
    rc, log = train_main(train_args(shapes_shards, run, **{
        "optim.lr_image": 0.0, "optim.lr_text": 0.0, "optim.lr_head": 0.0, "train.max_steps": 6}))
    assert rc == 0, log[-3000:]
    last = [ln for ln in log.splitlines() if ln.strip()][-3:]
    warning = next((ln for ln in last if "this run has not learned" in ln), None)
    assert warning, last
    losses = read_metrics(run)
    first, final = losses[min(losses)]["loss"], losses[max(losses)]["loss"]
    assert f"loss {first:.3f} at step {min(losses)} and {final:.3f} at step {max(losses)}" in warning
    val = read_metrics(run, "val")[6]
    assert f"(chance {100 / val['n_images']:.1f} on {int(val['n_images'])} images" in warning


@pytest.mark.slow
def test_the_cpu_config_the_readme_names_learns_a_small_photo_set(shapes_shards, tmp_path):
    """launch/configs/small-cpu.yaml (the README's CPU route) on ~170 small photos: recall
    far above chance, and no warning."""
    shards, tok, n = shapes_shards
    run = tmp_path / "run"
    over = {k: v for k, v in (o.split("=", 1) for o in train_overrides(shards, tok, n, run))
            if k in ("run_dir", "model.tokenizer", "data.train_shards", "data.val_shards")}
    rc, log = train_main(["--config", "launch/configs/small-cpu.yaml", *(f"{k}={v}" for k, v in over.items())])
    assert rc == 0, log[-3000:]
    assert "has not learned" not in log, log[-2000:]
    val = read_metrics(run, "val")
    res = val[max(val)]
    chance = 100 / res["n_images"]
    assert res["t2i_R@1"] >= 4 * chance and res["i2t_R@1"] >= 4 * chance, json.dumps(res)
    train = read_metrics(run)
    assert train[max(train)]["loss"] < 0.5 * math.log(32), train[max(train)]
