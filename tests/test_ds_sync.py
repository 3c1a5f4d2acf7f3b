"""DeepSpeed's steps read the host only where the skip needs it, in one process
(a gloo group of one): where DeepSpeed checks gradients for overflow itself (fp16; a
"bf16" block under ZeRO-1/2) a non-finite loss poisons the gradients, DeepSpeed skips
the step, and our code reads nothing; elsewhere (fp32, torch_autocast bf16 - the shipped
JSONs -, ZeRO-3 bf16) our code reads the skip flag once per step. A non-finite step is
skipped with the weights, the AdamW state and the BatchNorm statistics kept and the
schedule advanced, under both."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from phoclip.models.loss import ClipLoss
from phoclip_train.state import NonFiniteCounter
from phoclip_train.step import InputPrep, device_inputs, read_step, train_step
from test_step import batch, nan_batch, tiny_model

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
AUTO = {k: "auto" for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                            "gradient_clipping")}
CONFIGS = {  # name: (JSON, model, does DeepSpeed check overflow itself)
    "zero2_bf16_block": ({**AUTO, "zero_optimization": {"stage": 2}, "bf16": {"enabled": True},
                          "zero_allow_untested_optimizer": True, "steps_per_print": 10**9},
                         "tiny-debug-vit", True),  # a "bf16" block casts BatchNorm too, which CPUs refuse
    "zero2_bf16": ("launch/deepspeed/zero2_bf16.json", "tiny-debug", False),  # torch_autocast
    "zero2_fp32": ("launch/deepspeed/zero2_fp32.json", "tiny-debug", False),
    "zero3_bf16": ("launch/deepspeed/zero3_bf16.json", "tiny-debug", False),
}


@pytest.fixture(scope="module")
def process_group():
    """torch.distributed of one gloo process, as DeepSpeed needs it."""
    from dist_utils import free_port

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    mine = not torch.distributed.is_initialized()
    if mine:
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    yield
    if mine:
        torch.distributed.destroy_process_group()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def ds_engine(name: str, tmp_path: Path):
    from phoclip_train.build import build_optimizer
    from phoclip_train.config import RunConfig
    from phoclip_train.ds_engine import DeepSpeedEngine

    spec, model_name, _ = CONFIGS[name]
    path = ROOT / spec if isinstance(spec, str) else tmp_path / "ds.json"
    if not isinstance(spec, str):
        path.write_text(json.dumps(spec))
    cfg = RunConfig(run_dir=str(tmp_path / "run"))
    cfg.train.engine, cfg.train.deepspeed_config, cfg.train.precision = "deepspeed", str(path), "auto"
    cfg.data.batch_size = 8
    cfg.optim.warmup_steps = 0
    model = tiny_model(model_name)
    opt, sched = build_optimizer(model, cfg.optim, 100, fused=None)
    return DeepSpeedEngine(model, opt, sched, cfg=cfg, device=CPU, world_size=1)


class HostReads(torch.overrides.TorchFunctionMode):
    """Every item/tolist/bool/float/int of a tensor, by who asked: our code (phoclip,
    phoclip_train), DeepSpeed's own, or torch.optim's (AdamW reading its step counters,
    host tensors also on a GPU: not a device sync)."""

    READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__"}

    def __init__(self):
        super().__init__()
        self.ours: list[str] = []
        self.deepspeed: list[str] = []
        self.torch_optim = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS:
            f = sys._getframe(1)
            if "/torch/optim/" in f.f_code.co_filename:
                self.torch_optim += 1
            else:
                while f is not None and "/torch/" in f.f_code.co_filename:
                    f = f.f_back
                fn = f.f_code.co_filename if f is not None else ""
                where = f"{fn.rsplit('/', 1)[-1]}:{f.f_lineno if f else 0}"
                if "/deepspeed/" in fn:
                    self.deepspeed.append(where)
                elif fn.startswith(str(ROOT)) and "-packages/" not in fn and "/tests/" not in fn:
                    self.ours.append(where)
        return func(*args, **(kwargs or {}))


def _step(eng, b, counter) -> object:
    prep = InputPrep(CPU, 64, eng.input_dtype)
    out = train_step(eng.model, eng, ClipLoss(), device_inputs([b], prep, eng.model))
    counter.update(out.bad)
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_deepspeed_step_reads_the_host_only_for_the_skip(process_group, tmp_path, name):
    eng = ds_engine(name, tmp_path)
    assert eng.skips_itself == CONFIGS[name][2] == eng.skips_on_device
    counter = NonFiniteCounter()
    _step(eng, batch(seed=1), counter)  # DeepSpeed's lazy first-step state
    reads = []
    for s in (2, 3):
        with HostReads() as hr:
            out = _step(eng, batch(seed=s), counter)
        reads.append(hr)
    for hr in reads:
        if eng.skips_itself:
            assert hr.ours == [], hr.ours  # ours removed: DeepSpeed's own check decides the skip
            assert [w.split(":")[0] for w in hr.deepspeed] == ["stage_1_and_2.py"], hr.deepspeed  # its overflow flag
        else:
            assert [w.split(":")[0] for w in hr.ours] == ["step.py"], hr.ours  # the one read the skip needs
    with HostReads() as hr:
        metrics, _ = read_step(out, counter, False, eng.lrs())
    assert len(hr.ours) == 1 and metrics["grad_norm"] == metrics["grad_norm"] > 0


@pytest.mark.parametrize("name", ["zero2_bf16_block", "zero2_fp32"])
def test_deepspeed_skips_a_non_finite_step_and_advances_the_schedule(process_group, tmp_path, name):
    eng = ds_engine(name, tmp_path)
    counter = NonFiniteCounter()
    _step(eng, batch(seed=1), counter)
    base = getattr(eng.optimizer, "optimizer", eng.optimizer)

    def state():
        st = {f"model.{k}": v.detach().clone() for k, v in eng.model.state_dict().items()}
        for i, s in enumerate(base.state.values()):
            st.update({f"opt.{i}.{k}": v.clone() for k, v in s.items() if torch.is_tensor(v)})
        return st

    before, sched = state(), eng.scheduler.last_epoch
    if CONFIGS[name][1] == "tiny-debug":
        assert any("running_mean" in k for k in before)  # BatchNorm statistics are checked too
    _step(eng, nan_batch(2), counter)
    after = state()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert eng.scheduler.last_epoch == sched + 1  # the schedule advances as under DDP
    if eng.skips_itself:
        assert not eng.ds.was_step_applied()  # DeepSpeed's own check skipped it
    out = _step(eng, batch(seed=3), counter)
    read_step(out, counter, False, eng.lrs())
    assert counter.total == 1 and counter.streak == 0
    assert sum(not torch.equal(before[k], v) for k, v in state().items()) > 10  # the good step stepped
