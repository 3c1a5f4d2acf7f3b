"""The training step as plain functions (phoclip_train.step), on tensors with a tiny
model: no shards, YAML or run folder. Non-finite steps are skipped on the device on
every rank alike (weights, optimizer state and BatchNorm statistics kept, the schedule
advanced), steps between reads make no host sync, the streak and total are counted,
trimming and channels_last change nothing but the cost."""
import pytest
import torch

from conftest import padded_ids
from phoclip.models.loss import ClipLoss
from phoclip.models.factory import create_model
from phoclip_train.build import build_optimizer
from phoclip_train.config import OptimConfig
from phoclip_train.engine import DDPEngine
from phoclip_train.state import NonFiniteCounter
from phoclip_train.step import InputPrep, device_inputs, optimizer_step, read_step, skip_flag, train_step

CPU = torch.device("cpu")


def tiny_model(name: str = "tiny-debug", seed: int = 0):
    torch.manual_seed(seed)
    return create_model(name, text={"hf_config": {"vocab_size": 100}})


def ddp_engine(model, fused: bool = True, precision: str = "fp32") -> DDPEngine:
    opt, sched = build_optimizer(model, OptimConfig(warmup_steps=0), 100, fused=fused)
    return DDPEngine(model, opt, sched, precision=precision, grad_clip=1.0, device=CPU, world_size=1, rank=0)


def batch(n: int = 8, seed: int = 0, width: int = 24, size: int = 64) -> dict:
    """A stream batch: uint8 images, ids padded (pad 1) after captions of varied length."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, width - 6, (n,), generator=g).tolist()
    return {"images": torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
            "input_ids": padded_ids(lengths, width, seed=seed)}


def nan_batch(seed: int) -> dict:
    b = batch(seed=seed)
    from phoclip.data.transforms import normalize_images

    img = normalize_images(b["images"])
    img[0, 0, 0, 0] = float("nan")
    return dict(b, images=img)


def _state(model, engine) -> dict:
    st = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    for i, s in enumerate(engine.optimizer.state.values()):
        st.update({f"opt.{i}.{k}": v.clone() for k, v in s.items() if torch.is_tensor(v)})
    return st


def test_non_finite_step_is_skipped_on_the_device_without_a_read():
    """A NaN batch: weights, AdamW moments and BatchNorm statistics unchanged, the
    schedule advanced, nothing read on the host; the next read reports the skip, and a
    good step after it steps."""
    from test_throughput import _SyncCounter

    model = tiny_model()
    eng = ddp_engine(model)
    assert eng.skips_on_device
    prep, loss, counter = InputPrep(CPU, 64), ClipLoss(), NonFiniteCounter()
    counter.update(train_step(model, eng, loss, device_inputs([batch(seed=1)], prep, model)).bad)
    before, sched0 = _state(model, eng), eng.scheduler.last_epoch
    assert any(k.startswith("model.visual") and "running_mean" in k for k in before)  # BatchNorm is there
    with _SyncCounter() as sc:
        out = train_step(model, eng, loss, device_inputs([nan_batch(2)], prep, model))
        counter.update(out.bad)
    assert sc.ours == [], sc.ours
    after = _state(model, eng)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert eng.scheduler.last_epoch == sched0 + 1  # the schedule advances on a skipped step
    assert counter.total == 0 and float(out.bad) == 1.0  # not read yet
    good = train_step(model, eng, loss, device_inputs([batch(seed=3)], prep, model))
    counter.update(good.bad)
    metrics, stop = read_step(good, counter, False, eng.lrs())
    assert counter.total == 1 and counter.streak == 0 and metrics["loss"] == metrics["loss"] and not stop
    changed = sum(not torch.equal(before[f"model.{k}"], v) for k, v in model.state_dict().items())
    assert changed > 10  # the good step did step


def test_steps_between_reads_make_no_host_sync():
    """A step reads nothing from the device in our code; `read_step` reads once (one
    `tolist` of every figure, the streak and the stop flag)."""
    from test_throughput import _SyncCounter

    model = tiny_model()
    eng = ddp_engine(model)
    prep, loss, counter = InputPrep(CPU, 64, trim_padding=1, pack_captions=True), ClipLoss(), NonFiniteCounter()
    counter.update(train_step(model, eng, loss, device_inputs([batch(seed=1)], prep, model)).bad)  # lazy state
    with _SyncCounter() as sc:
        out = train_step(model, eng, loss, device_inputs([batch(seed=2)], prep, model))
        counter.update(out.bad)
    assert sc.ours == [], sc.ours
    with _SyncCounter() as sc:
        metrics, stop = read_step(out, counter, True, eng.lrs())
    assert len(sc.ours) == 1 and "step.py" in sc.ours[0], sc.ours
    assert stop is True and set(metrics) >= {"loss", "contrastive_loss", "grad_norm", "logit_scale", "lr", "lrs"}


def test_an_engine_without_a_device_skip_reads_once_and_skips():
    """An unfused AdamW cannot take the skip as a tensor: the step reads the flag once
    (in optimizer_step) and skips alike, buffers restored."""
    from test_throughput import _SyncCounter

    model = tiny_model()
    eng = ddp_engine(model, fused=False)
    assert not eng.skips_on_device
    prep, loss = InputPrep(CPU, 64), ClipLoss()
    train_step(model, eng, loss, device_inputs([batch(seed=1)], prep, model))
    before = _state(model, eng)
    with _SyncCounter() as sc:
        out = train_step(model, eng, loss, device_inputs([nan_batch(2)], prep, model))
    assert [w.split(" at ")[1].split(":")[0] for w in sc.ours] == ["train/phoclip_train/step.py"], sc.ours
    assert float(out.bad) == 1.0
    after = _state(model, eng)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_streak_and_total_of_non_finite_steps():
    """The device counters: the streak restarts at a good step, the total only grows,
    both survive a read, and the total travels with a checkpoint."""
    c = NonFiniteCounter()
    for bad in (1.0, 1.0, 0.0, 1.0, 1.0, 1.0):
        c.update(torch.tensor(bad))
    assert c.fold(*c.device_values(CPU).tolist()) == 5 and (c.streak, c.total) == (3, 5)
    c.update(torch.tensor(1.0))
    assert c.fold(*c.device_values(CPU).tolist()) == 1 and (c.streak, c.total) == (4, 6)
    c.update(torch.tensor(0.0))
    assert c.fold(*c.device_values(CPU).tolist()) == 0 and (c.streak, c.total) == (0, 6)
    back = NonFiniteCounter()
    back.load_state_dict(c.state_dict())
    assert back.total == 6


class _Eng:
    handles_overflow = False


def _agree_worker(rank: int, world: int) -> None:
    # rank 1 alone has a non-finite loss; rank 0's gradient norm alone is non-finite
    # in the second case: every rank skips both steps
    loss_flag = torch.tensor(float(rank == 1))
    assert float(skip_flag(loss_flag, torch.tensor(1.0), _Eng())) == 1.0
    gnorm = torch.tensor(float("inf") if rank == 0 else 1.0)
    assert float(skip_flag(torch.tensor(0.0), gnorm, _Eng())) == 1.0
    assert float(skip_flag(torch.tensor(0.0), torch.tensor(1.0), _Eng())) == 0.0
    over = type("Fp16", (), {"handles_overflow": True})()  # the scaler's overflow is not a fault
    assert float(skip_flag(torch.tensor(0.0), gnorm, over)) == 0.0


def test_every_rank_skips_alike():
    """The skip flag is a max over ranks: one rank's non-finite loss or gradient skips
    the step everywhere (2 gloo processes)."""
    from dist_utils import run_distributed

    run_distributed(_agree_worker, 2)


def _steps(model, eng, prep, batches) -> list[float]:
    counter, losses = NonFiniteCounter(), []
    for b in batches:
        out = train_step(model, eng, ClipLoss(), device_inputs([b], prep, model))
        counter.update(out.bad)
        losses.append(read_step(out, counter, False, eng.lrs())[0]["loss"])
    return losses


def test_trimmed_inputs_give_the_padded_step():
    """data.trim_padding: the inputs are cut after the longest caption on the CPU, and
    the steps' losses (the first step's update counting in the next) equal the padded
    ones."""
    b = [batch(seed=s) for s in (1, 2, 3)]
    widths, losses = {}, {}
    for trim in (0, 1):
        model = tiny_model()
        prep = InputPrep(CPU, 64, trim_padding=trim)
        widths[trim] = device_inputs([b[0]], prep, model)[0][1].shape[1]
        losses[trim] = _steps(model, ddp_engine(model), prep, b)
    longest = int((b[0]["input_ids"] != 1).sum(1).max())
    assert widths[0] == 24 and widths[1] == longest < 24
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_channels_last_is_a_layout_not_another_model(tmp_path):
    """train.channels_last changes memory strides only: the same losses from the same
    weights and batches, and the saved weights load back exactly."""
    from phoclip.models.factory import load_model

    b = [batch(seed=s) for s in (1, 2, 3)]
    losses = {}
    for cl in (False, True):
        model = tiny_model()
        if cl:
            model.visual.to(memory_format=torch.channels_last)
        conv = next(m for m in model.visual.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) == cl
        prep = InputPrep(CPU, 64, channels_last=cl)
        assert device_inputs([b[0]], prep, model)[0][0].is_contiguous(memory_format=torch.channels_last) == cl
        losses[cl] = _steps(model, ddp_engine(model), prep, b)
        back = load_model(model.save_pretrained(tmp_path / str(cl))).state_dict()
        assert all(torch.equal(v, back[k]) for k, v in model.state_dict().items())
    assert losses[False][0] != losses[False][2]  # it trained
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_optimizer_step_clips_and_reports_the_norm_before_clipping():
    """grad_clip=1.0: the returned norm is the one before clipping; the gradients the
    optimizer applied were clipped to norm 1."""
    model = tiny_model()
    eng = ddp_engine(model)
    for p in model.parameters():
        p.grad = torch.full_like(p, 10.0) if p.requires_grad else None
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    want = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    gnorm, bad = optimizer_step(model, eng, torch.tensor(0.0))
    assert float(bad) == 0.0 and float(gnorm) == pytest.approx(float(want), rel=1e-5) and float(gnorm) > 1
    applied = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert float(applied) == pytest.approx(1.0, rel=1e-4)
