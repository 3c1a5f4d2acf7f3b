"""The torchrun trainer: real 2-process gloo runs of launch/train_ddp.py on tiny shards."""

import pytest
import torch

from conftest import read_metrics, run_torchrun, train_overrides

pytestmark = pytest.mark.slow


def test_two_process_run_learns_checkpoints_resumes_and_logs(shapes_shards, tmp_path):
    shards, tok, n = shapes_shards
    run = tmp_path / "run"
    args = ["--config", "launch/configs/tiny-debug.yaml",
            *train_overrides(shards, tok, n, run, **{"train.max_steps": 24, "train.save_every": 8,
                                                     "train.keep_last": 2, "train.eval_every": 24,
                                                     "train.eval_queries": '["hình tròn màu đỏ"]'})]
    run_torchrun(2, "launch/train_ddp.py", args)
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
    assert ckpts == ["step_00000016", "step_00000024"]
    assert (run / "config.yaml").is_file() and (run / "model" / "model.safetensors").is_file()
    val = read_metrics(run, "val")
    assert 24 in val and 0 <= val[24]["t2i_R@1"] <= 100
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
    # the retrieval grid of the configured query, 5 images, at the validation step
    grid = ev.Images("val_retrieval/0")
    assert len(grid) == 1 and grid[0].step == 24

    # resume: continue from step 24 to 30 with the saved optimizer state
    saved = torch.load(run / "checkpoints/step_00000024/state.pt", weights_only=True)
    assert saved["optimizer"]["state"], "optimizer state must be checkpointed"
    args2 = [a if not a.startswith("train.max_steps=") else "train.max_steps=30" for a in args]
    r = run_torchrun(2, "launch/train_ddp.py", args2 + ["--resume", "latest"])
    assert "resumed from" in r.stderr and "step_00000024" in r.stderr
    m2 = read_metrics(run)
    assert sorted(m2) == list(range(1, 31))
    from phoclip_train.build import lr_lambda

    # the schedule continued from step 24 (of the new 30-step cosine), no warmup again
    assert m2[25]["lr"] == pytest.approx(3e-3 * lr_lambda(2, 30, "cosine", 0.0)(25))
    assert m2[25]["lr"] < 3e-3 * 0.5


def test_tokenizer_mismatch_refused(shapes_shards, tmp_path, tiny_tokenizer_dir):
    shards, tok, n = shapes_shards
    r = run_torchrun(2, "launch/train_ddp.py",
                     ["--config", "launch/configs/tiny-debug.yaml",
                      *train_overrides(shards, tiny_tokenizer_dir, n, tmp_path / "r")], check=False)
    assert r.returncode != 0
    assert "do not fit the model's tokenizer" in r.stderr and str(shards) in r.stderr
    assert "Re-shard" in r.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_stay_finite(shapes_shards, tmp_path, precision):
    shards, tok, n = shapes_shards
    run = tmp_path / precision
    run_torchrun(2, "launch/train_ddp.py", ["--config", "launch/configs/tiny-debug.yaml",
                 *train_overrides(shards, tok, n, run, **{"train.precision": precision, "train.max_steps": 5})])
    m = read_metrics(run)
    assert len(m) == 5
    assert all(torch.isfinite(torch.tensor(s["loss"])) and s["nonfinite_steps"] == 0 for s in m.values())


def test_non_resampled_uneven_shards_do_not_hang(shapes_shards, tmp_path):
    shards, tok, n = shapes_shards
    # uneven: drop a sample-heavy shard so ranks get different amounts of data
    run = tmp_path / "nr"
    run_torchrun(2, "launch/train_ddp.py", ["--config", "launch/configs/tiny-debug.yaml",
                 *train_overrides(shards, tok, n - 1, run, **{"data.resampled": False, "train.max_steps": 14,
                                                              "train.save_every": 100})], timeout=240)
    m = read_metrics(run)
    assert sorted(m) == list(range(1, 15))
    assert m[14]["epoch"] > 1.0  # went past an epoch boundary without hanging
