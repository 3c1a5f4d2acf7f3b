"""The global loss: 2 real gloo processes with half a batch each give the same loss and
the same gradient on every parameter as one process on the whole batch."""

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_utils import run_distributed

B = 4  # per rank


def _data(world):
    g = torch.Generator().manual_seed(123)
    images = torch.randn(world * B, 3, 64, 64, generator=g)
    ids = torch.randint(5, 50, (world * B, 12), generator=g)
    ids[:, 0], ids[:, -3:] = 0, 1  # <s> ... <pad>
    return images, ids


def _model(kind):
    import phoclip

    torch.manual_seed(0)
    extra = {"logit_bias": {"init": -10.0}} if kind == "siglip" else {}
    return phoclip.create_model("tiny-debug-vit", text={"hf_config": {"vocab_size": 64}}, **extra)


def _loss_value(model, loss_fn, images, ids):
    out = model(images, ids)
    args = [out["image_features"], out["text_features"], out["logit_scale"]]
    if "logit_bias" in out:
        args.append(out["logit_bias"])
    return sum(loss_fn(*args).values())


def _check(rank, world, kind, local_loss):
    from phoclip.models.loss import create_loss

    images, ids = _data(world)
    ref = _model(kind)
    ref_loss = _loss_value(ref, create_loss(kind, 0, 1, local_loss), images, ids)
    ref_loss.backward()

    model = DDP(_model(kind))
    sl = slice(rank * B, (rank + 1) * B)
    loss = _loss_value(model, create_loss(kind, rank, world, local_loss), images[sl], ids[sl])
    loss.backward()
    # the mean of the ranks' losses is the global loss
    avg = loss.detach().clone()
    dist.all_reduce(avg)
    avg /= world
    torch.testing.assert_close(avg, ref_loss.detach(), rtol=1e-5, atol=1e-6)
    n = 0
    for (name, p), (_, q) in zip(model.module.named_parameters(), ref.named_parameters()):
        assert p.grad is not None, name
        # float32 rounding is relative to the tensor's scale, not to each element: an
        # element 1e4x smaller than its neighbours carries their absolute rounding error
        atol = 1e-6 * max(1.0, float(q.grad.abs().max()))
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=atol, msg=lambda m: f"{name}: {m}")
        n += 1
    assert n > 50


CASES = [("clip", True), ("clip", False), ("siglip", True)]


def _check_all(rank, world):
    for kind, local_loss in CASES:
        try:
            _check(rank, world, kind, local_loss)
        except AssertionError as e:
            raise AssertionError(f"{kind} local_loss={local_loss}: {e}") from e


@pytest.mark.slow  # two spawned processes (make test runs it)
def test_two_processes_equal_one_full_batch():
    """Every loss form in one pair of processes: spawning them (each importing torch, timm
    and transformers) costs more than the checks."""
    run_distributed(_check_all, 2)


def test_local_and_full_forms_agree_single_process():
    from phoclip.models.loss import ClipLoss

    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1).requires_grad_()
    b = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1).requires_grad_()
    s = torch.tensor(10.0)
    l1 = ClipLoss(local_loss=True)(a, b, s)["contrastive_loss"]
    l2 = ClipLoss(local_loss=False)(a, b, s)["contrastive_loss"]
    torch.testing.assert_close(l1, l2)
    # perfectly aligned features with a large scale give a near-zero loss
    eye = torch.eye(6, 8)
    assert ClipLoss()(eye, eye, torch.tensor(100.0))["contrastive_loss"] < 1e-3


def test_loss_in_fp32_under_autocast():
    from phoclip.models.loss import ClipLoss

    a = torch.randn(4, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ClipLoss()(a, a, torch.tensor(10.0))["contrastive_loss"]
    assert out.dtype == torch.float32
