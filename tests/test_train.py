"""The trainer end to end: the shared 2-rank torchrun reference run (gloo) read back, and
single-process runs of train_ddp.main for what one process proves as well."""
import json
import shutil

import pytest
import torch

from conftest import read_metrics, reference_args, train_args, train_main, train_overrides, TINY

pytestmark = pytest.mark.slow


def test_two_process_run_learns_checkpoints_logs_and_crosses_uneven_epochs(reference_run, shapes_shards):
    run = reference_run
    m = read_metrics(run)
    assert sorted(m) == list(range(1, 25))
    # learning, over enough steps that batch-to-batch noise (±0.15 here) cannot decide it
    first = sum(m[s]["loss"] for s in range(1, 5)) / 4
    last = sum(m[s]["loss"] for s in range(21, 25)) / 4
    assert last < first - 0.1, [round(m[s]["loss"], 3) for s in sorted(m)]
    for s in m.values():
        assert {"loss", "lr", "samples_per_s", "grad_norm", "logit_scale", "lrs"} <= set(s)
    # per-group learning rates hold the configured ratios
    lrs = m[2]["lrs"]
    assert lrs["image"] == pytest.approx(1e-3) and lrs["text"] == pytest.approx(1e-3)
    assert lrs["head"] == pytest.approx(3e-3)
    # the last K=2 checkpoints are kept, complete
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step_00000021", "step_00000024"]
    assert (run / "config.yaml").is_file() and (run / "model" / "model.safetensors").is_file()
    val = read_metrics(run, "val")
    assert 24 in val and 0 <= val[24]["t2i_R@1"] <= 100
    # epoch order over shards that do not share out evenly (rank 0 reads 3 shards of 30,
    # rank 1 two of 30 and one of 21): past an epoch boundary without a hang
    sizes = json.loads((shapes_shards[0] / "sizes.json").read_text())
    train = [v for k, v in sorted(sizes.items()) if k.startswith("train-")]
    per_rank = [sum(train[0::2]), sum(train[1::2])]
    assert per_rank[0] != per_rank[1], per_rank
    assert m[24]["epoch"] > 1.0
    # TensorBoard holds the scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(run / "tensorboard"))
    ev.Reload()
    tags = set(ev.Tags()["scalars"])
    for t in ("train/loss", "train/lrs/image", "train/lrs/text", "train/lrs/head", "train/logit_scale",
              "train/grad_norm", "train/samples_per_s", "train/data_wait_s", "train/skipped_samples",
              "val/t2i_R@1", "val/i2t_R@10"):
        assert t in tags, t
    assert len(ev.Scalars("train/loss")) == 24
    # the retrieval grid of the configured query, 5 images, at the validation step, tagged with its words
    grid = ev.Images("val_retrieval/00_hình_tròn_màu_đỏ")
    assert len(grid) == 1 and grid[0].step == 24
    saved = torch.load(run / "checkpoints/step_00000024/state.pt", weights_only=True)
    assert saved["optimizer"]["state"], "optimizer state must be checkpointed"


def test_resume_continues_the_schedule_with_the_saved_optimizer(reference_run, shapes_shards, tmp_path):
    """From the reference's step 24 on to 30 (a new 30-step cosine): no warmup again."""
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    rc, log = train_main(reference_args(shapes_shards, run, False, **{"train.max_steps": 30}) + ["--resume", "latest"])
    assert rc == 0, log[-4000:]
    assert "resumed from" in log and "step_00000024" in log
    m2 = read_metrics(run)
    assert sorted(m2) == list(range(1, 31))
    from phoclip_train.build import lr_lambda

    # the schedule continued from step 24 (of the new 30-step cosine), no warmup again
    assert m2[25]["lr"] == pytest.approx(3e-3 * lr_lambda(2, 30, "cosine", 0.0)(25))
    assert m2[25]["lr"] < 3e-3 * 0.5


def test_tokenizer_mismatch_refused(shapes_shards, tmp_path, tiny_tokenizer_dir):
    shards, tok, n = shapes_shards
    rc, log = train_main(["--config", TINY, *train_overrides(shards, tiny_tokenizer_dir, n, tmp_path / "r")])
    assert rc == 2, log[-3000:]
    assert "refused:" in log and "do not fit the model's tokenizer" in log and str(shards) in log
    assert "Re-shard" in log and "Traceback" not in log
    assert not (tmp_path / "r" / "checkpoints").exists()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_stay_finite(shapes_shards, tmp_path, precision):
    run = tmp_path / precision
    rc, log = train_main(train_args(shapes_shards, run, **{"train.precision": precision, "train.max_steps": 5}))
    assert rc == 0, log[-4000:]
    m = read_metrics(run)
    assert len(m) == 5
    assert all(torch.isfinite(torch.tensor(s["loss"])) and s["nonfinite_steps"] == 0 for s in m.values())


def test_the_end_of_a_run_draws_its_curves_into_the_run_folder_and_the_model_card(tiny_run):
    """A user sees the run without TensorBoard: RUN_DIR/curves.png, copied into the
    exported model folder and shown by its card."""
    png = (tiny_run / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert (tiny_run / "model" / "curves.png").read_bytes() == png
    assert "](curves.png)" in (tiny_run / "model" / "README.md").read_text()
