"""DeepSpeed ZeRO-1/2/3 (fp32 and bf16 on CPU, gloo) through the same entry point, loop and
layout: one shared set of launched runs per ZeRO stage, refusals in process."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import (ROOT, job_env, kill9_after, launch_main, read_metrics, run_torchrun, torchrun_cmd, train_main,
                      train_overrides)
from dist_utils import free_port

pytestmark = pytest.mark.slow
ENV = job_env()


def ds_cmd(args):
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
            str(free_port()), str(ROOT / "launch/train_deepspeed.py"), *map(str, args)]


def run_ds(args, timeout=400):
    r = subprocess.run(ds_cmd(args), capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"deepspeed failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


def _args(shapes_shards, run, ds_json, **kw):
    shards, tok, n = shapes_shards
    base = {"train.max_steps": 10, "train.save_every": 5, "data.batch_size": 8}
    base.update(kw)
    return ["--config", "launch/configs/tiny-debug.yaml", "--deepspeed_config", ds_json,
            *train_overrides(shards, tok, n, run, **base)]


def _fp32_json(folder, name):
    ds_json = json.loads((ROOT / f"launch/deepspeed/{name}").read_text())
    ds_json.pop("torch_autocast")
    f = folder / name.replace("bf16", "fp32")
    f.write_text(json.dumps(ds_json))
    return f


# ----------------------------------------------------------------------------- shared runs
# What each ZeRO stage must show, from one set of fp32 runs per stage (fp32: DeepSpeed's
# step is then the DDP trainer's to float precision, and the run's own validation is what
# evaluate.py computes on the export):
#   ref   2 ranks, one 20-step schedule, killed with -9 after step 9 and resumed from its
#         step 8 under torchrun (DeepSpeed reads torchrun's environment);
#   one   ref's step 12 resumed on 1 rank (global batch kept: 2 micro-batches a step);
#   two   one's step 16 resumed on 2 ranks.
# A 2-step DDP run of the same config gives the first step DeepSpeed's must equal.
ZERO_KW = {"data.resampled": False, "data.global_batch_size": 16, "train.max_steps": 20, "train.save_every": 4,
           "train.keep_last": 5, "optim.lr_head": 1e-2, "optim.lr_image": 3e-3, "optim.lr_text": 3e-3,
           "train.eval_every": 7, "train.eval_queries": '["hai hình tròn màu đỏ"]'}
_ZERO_RUNS: dict = {}


@pytest.fixture(scope="module")
def ddp_first_steps(shapes_shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("ds_ddp") / "ddp"
    shards, tok, n = shapes_shards
    run_torchrun(2, "launch/train_ddp.py", ["--config", "launch/configs/tiny-debug.yaml",
                 *train_overrides(shards, tok, n, run, **{**ZERO_KW, "train.max_steps": 2})])
    return read_metrics(run)


@pytest.fixture(scope="module")
def zero_runs(shapes_shards, tmp_path_factory):
    """stage -> the shared runs of that ZeRO stage (built on first use, then read only):
    {"ref", "one", "two"} folders, "killed" (ref's metrics at the kill), "logs" (stderr)."""
    def get(stage: int) -> dict:
        if stage in _ZERO_RUNS:
            return _ZERO_RUNS[stage]
        base = tmp_path_factory.mktemp(f"zero{stage}")
        ds_json = str(_fp32_json(base, f"zero{stage}_bf16.json"))
        runs = {name: base / name for name in ("ref", "one", "two")}
        logs = {}

        def launch(nproc, name, resume_from=None):
            run = runs[name]
            if resume_from is not None and not (run / "checkpoints").exists():
                (run / "checkpoints").mkdir(parents=True)
                shutil.copytree(resume_from, run / "checkpoints" / resume_from.name)
            args = _args(shapes_shards, run, ds_json, **ZERO_KW) + (["--resume", "latest"] if resume_from else [])
            return run_torchrun(nproc, "launch/train_deepspeed.py", args, timeout=400).stderr

        killed = kill9_after(torchrun_cmd(2, "launch/train_deepspeed.py",
                                          _args(shapes_shards, runs["ref"], ds_json, **ZERO_KW)), runs["ref"], 9,
                             timeout=300)
        logs["ref"] = launch(2, "ref", runs["ref"] / "checkpoints" / "step_00000008")
        logs["one"] = launch(1, "one", runs["ref"] / "checkpoints" / "step_00000012")
        logs["two"] = launch(2, "two", runs["one"] / "checkpoints" / "step_00000016")
        _ZERO_RUNS[stage] = {**runs, "killed": killed, "logs": logs}
        return _ZERO_RUNS[stage]
    return get


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_first_step_equals_ddp(zero_runs, ddp_first_steps, stage):
    ref = read_metrics(zero_runs(stage)["ref"])
    assert ref[1]["loss"] == pytest.approx(ddp_first_steps[1]["loss"], rel=1e-5)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_learns_validates_and_logs(zero_runs, stage):
    """ZeRO-3 partitions every parameter: the logged temperature, validation (rank 1 holds
    no validation shard: the ranks must still run the same forwards), the retrieval grids
    and TensorBoard must all work on slices."""
    run = zero_runs(stage)["ref"]
    m = read_metrics(run)
    assert sorted(m) == list(range(1, 21))
    first = sum(m[s]["loss"] for s in (1, 2, 3)) / 3
    last = sum(m[s]["loss"] for s in (18, 19, 20)) / 3
    assert last < first - 0.05, (first, last)
    assert m[2]["lrs"]["head"] == pytest.approx(1e-2) and m[2]["lrs"]["image"] == pytest.approx(3e-3)
    assert all(torch.isfinite(torch.tensor(s["grad_norm"])) for s in m.values())
    scales = [m[s]["logit_scale"] for s in m]
    assert all(0 < v <= 100 for v in scales) and len(set(scales)) > 1  # read, and it moves
    assert sorted(read_metrics(run, "val")) == [7, 14, 20]  # validation ran with one rank out of shards
    assert list((run / "tensorboard").rglob("events*"))


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_resumes_after_kill9_where_it_stopped(zero_runs, stage):
    runs = zero_runs(stage)
    assert "resumed from" in runs["logs"]["ref"] and "step_00000008" in runs["logs"]["ref"]
    m = read_metrics(runs["ref"])
    assert m[9]["loss"] == pytest.approx(runs["killed"][9]["loss"], rel=1e-4)  # same state, same data
    assert m[9]["logit_scale"] == pytest.approx(runs["killed"][9]["logit_scale"], rel=1e-6)


def _adam_steps(ckpt) -> set:
    """AdamW's step count as DeepSpeed's own optimizer files hold it (every rank, every group)."""
    out = set()
    for f in (ckpt / "deepspeed").glob("*optim_states.pt"):
        sd = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        st = sd["base_optimizer_state"] if "base_optimizer_state" in sd else sd["optimizer_state_dict"]
        out |= {int(v["step"]) for v in st["state"].values()}
    return out


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_on_another_number_of_ranks_continues_the_run(zero_runs, stage):
    """ZeRO-2/3, 2 ranks -> 1 -> 2 in one schedule of 20 steps: ref's step 12 resumed on
    1 rank; that run's step 16 resumed on 2 ranks. Each resume goes through DeepSpeed's
    universal checkpoint and must continue the run, not restart it (the known trap: a
    load without error, then the loss of a fresh model):
    - the temperature right after the resume is the saved one, exactly (logged before the
      step updates it: the same whatever the batch);
    - the loss right after the resume is the one the run had reached, not the first steps';
    - AdamW's step count in DeepSpeed's own files continues (16, then 20), every group's
      learning rate at every step is the reference's (schedule position and per-group
      hyperparameters), the loaded state matches the saved fingerprint;
    - data.global_batch_size keeps 16 samples a step (1 rank accumulates 2 micro-batches)
      and the data order continues as on DDP (relayout)."""
    runs = zero_runs(stage)
    ref, one, two = (read_metrics(runs[n]) for n in ("ref", "one", "two"))
    assert sorted(one) == list(range(13, 21)) and sorted(two) == list(range(17, 21))
    for out, (a, b), prev, m, k in ((runs["logs"]["one"], (2, 1), ref, one, 13),
                                    (runs["logs"]["two"], (1, 2), one, two, 17)):
        assert f"written by {a} ranks, this run has {b}: converting it to DeepSpeed's universal" in out, out[-3000:]
        assert f"loaded DeepSpeed state verified against deepspeed_state.json: weights, AdamW moments, " \
               f"optimizer step {k - 1}, 6 parameter groups, schedule at step {k - 1}" in out, out[-3000:]
        assert f"written by {a} ranks x 1 workers, this run has {b} x 1: the data order continues" in out
        assert "global batch 16 -> 16" in out
        assert m[k]["logit_scale"] == pytest.approx(prev[k]["logit_scale"], rel=1e-6)
        assert m[k]["loss"] == pytest.approx(prev[k]["loss"], abs=0.08), (m[k]["loss"], prev[k]["loss"])
        assert m[k]["loss"] < ref[1]["loss"] - 0.15, (m[k]["loss"], ref[1]["loss"])
        for s in m:
            assert m[s]["lrs"] == pytest.approx(ref[s]["lrs"], rel=1e-9), s
            if s - 1 in m:  # 16 samples a step whatever the ranks
                assert m[s]["epoch"] - m[s - 1]["epoch"] == pytest.approx(16 / 171, rel=1e-6), s
    assert _adam_steps(runs["one"] / "checkpoints" / "step_00000016") == {16}
    assert _adam_steps(runs["two"] / "checkpoints" / "step_00000020") == {20}
    assert not list((runs["one"] / "checkpoints").glob("*.universal.tmp"))  # the conversion is removed


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_checkpoint_exports_the_trained_model(zero_runs, shapes_shards, tmp_path, stage):
    """The end-of-run export holds whole tensors, equal to those gathered from the ZeRO
    checkpoint by export_model.py, and evaluate.py on it reproduces the run's own last
    validation: the exported model is the trained one."""
    from safetensors.torch import load_file

    from phoclip.models.factory import load_model

    run = zero_runs(stage)["ref"]
    w = load_file(str(run / "model" / "model.safetensors"))
    assert all(t.numel() > 0 for t in w.values())
    assert launch_main("export_model", [run / "checkpoints" / "step_00000020", tmp_path / "exported"]) == 0
    a, b = load_model(tmp_path / "exported").eval(), load_model(run / "model").eval()
    x = torch.randn(3, 3, 32, 32)
    ids = torch.randint(4, 20, (3, 10))
    torch.testing.assert_close(a.encode_image(x), b.encode_image(x))
    torch.testing.assert_close(a.encode_text(ids), b.encode_text(ids))
    shards = shapes_shards[0]
    assert launch_main("evaluate", ["--model", run / "model", "--shards", f"{shards}/val-000000.tar",
                                    "--out", tmp_path / "eval.json"]) == 0
    ev = json.loads((tmp_path / "eval.json").read_text())
    val = read_metrics(run, "val")[20]
    for k in ("t2i_R@1", "t2i_R@5", "i2t_R@1", "i2t_mean_rank"):
        assert ev[k] == pytest.approx(val[k], abs=1e-6), k


# ----------------------------------------------------------------------------- bf16, refusals

@pytest.mark.parametrize("stage", [1, 2])
def test_zero_bf16_learns_with_per_group_lrs(shapes_shards, tmp_path, stage):
    """The shipped bf16 JSONs as written, through DeepSpeed's own launcher."""
    run = tmp_path / f"z{stage}"
    run_ds(_args(shapes_shards, run, f"launch/deepspeed/zero{stage}_bf16.json",
                 **{"train.precision": "bf16", "train.max_steps": 12, "train.save_every": 100}))
    m = read_metrics(run)
    assert sorted(m) == list(range(1, 13))
    first = sum(m[s]["loss"] for s in (1, 2, 3)) / 3
    last = sum(m[s]["loss"] for s in (10, 11, 12)) / 3
    assert last < first - 0.05, (first, last)
    lrs = m[2]["lrs"]
    assert lrs["image"] == pytest.approx(1e-3) and lrs["text"] == pytest.approx(1e-3)
    assert lrs["head"] == pytest.approx(3e-3)
    assert all(torch.isfinite(torch.tensor(s["grad_norm"])) for s in m.values())


def test_ds_json_disagreeing_with_run_config_refused(shapes_shards, tmp_path):
    """In process (train_deepspeed's main): the refusal comes before DeepSpeed starts."""
    bad = json.loads((ROOT / "launch/deepspeed/zero2_bf16.json").read_text())
    bad["train_micro_batch_size_per_gpu"] = 5
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(bad))
    rc, log = train_main(_args(shapes_shards, tmp_path / "r", f, **{"train.precision": "bf16"}))
    assert rc == 2, log[-3000:]
    assert "train_micro_batch_size_per_gpu=5 disagrees" in log
    from phoclip_train.config import ConfigError, resolve_config
    from phoclip_train.ds_config import resolve_ds_config

    cfg = resolve_config(None, ["train.precision=fp32", "data.train_shards=x"])
    with pytest.raises(ConfigError, match="trains in bf16"):
        resolve_ds_config(str(ROOT / "launch/deepspeed/zero2_bf16.json"), cfg, 2)


def test_zero2_fp16_json_runs_where_the_cpu_has_fp16_else_is_refused_in_one_line(shapes_shards, tmp_path):
    """DeepSpeed's CPU accelerator enables fp16 only where oneDNN has fp16 kernels
    (AVX512-FP16/AMX-FP16 CPUs: `torch.ops.mkldnn._is_mkldnn_fp16_supported()`); this
    machine's CPU has none, and DeepSpeed refuses the fp16 JSON in `initialize`. There it
    must end as one line and exit 2; where the CPU allows, it must train. In process: one
    process started without a launcher is a DeepSpeed job of one."""
    run = tmp_path / "fp16"
    rc, log = train_main(_args(shapes_shards, run, "launch/deepspeed/zero2_fp16.json",
                               **{"train.precision": "fp16", "train.max_steps": 6}))
    if torch.ops.mkldnn._is_mkldnn_fp16_supported():
        assert rc == 0, log[-4000:]
        assert sorted(read_metrics(run)) == list(range(1, 7))
    else:
        assert rc == 2, log[-4000:]
        assert "refused: Type fp16 is not supported on your device" in log
        assert "Traceback" not in log


def test_deepspeed_state_fingerprint_and_stage_change_refused(tmp_path):
    """The loaded state is compared with the saved fingerprint: a reset moment, step or
    group is named; a change of ZeRO stage is refused in one line before anything loads."""
    from types import SimpleNamespace

    from phoclip.errors import CheckpointError
    from phoclip_train.ds_engine import DeepSpeedEngine
    from phoclip_train.ds_state import compare_summaries

    saved = {"params": {"w": {"fp32": [4.0, 1.5], "exp_avg": [0.25, -0.1]}}, "numel": {"w": 8},
             "buffers": {"bn.running_var": [8.0, 2.0]}, "step": [8.0, 8.0],
             "groups": [{"name": "head", "lr": 1e-3, "weight_decay": 0.2}],
             "scheduler": {"last_epoch": 8, "base_lrs": [1e-3]}}
    assert compare_summaries(saved, json.loads(json.dumps(saved))) == []
    now = json.loads(json.dumps(saved))
    now["params"]["w"]["exp_avg"] = [0.0, 0.0]
    now["step"] = [1.0, 1.0]
    now["groups"][0]["weight_decay"] = 0.0
    now["buffers"]["bn.running_var"] = [8.0, 0.0]
    bad = compare_summaries(saved, now)
    assert bad == ["w exp_avg differs", "buffer bn.running_var differs", "optimizer step [1.0, 1.0] instead of "
                   "[8.0, 8.0]", "parameter group head: weight_decay 0.0 instead of 0.2"], bad
    ck = tmp_path / "step_00000008"
    (ck / "deepspeed").mkdir(parents=True)
    (ck / "deepspeed_state.json").write_text(json.dumps(dict(saved, zero_stage=2, world_size=2)))
    eng = SimpleNamespace(ds=SimpleNamespace(zero_optimization_stage=lambda: 3))
    with pytest.raises(CheckpointError, match="written under ZeRO stage 2, this run uses stage 3: a change of "
                                              "ZeRO stage is not supported"):
        DeepSpeedEngine.load(eng, ck)
