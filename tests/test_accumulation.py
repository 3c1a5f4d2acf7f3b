"""Gradient accumulation with cached features equals one k-times-larger batch
(phoclip_train.step.forward_backward, on tensors with a tiny model)."""

import pytest
import torch

from phoclip.models.loss import ClipLoss
from phoclip_train.step import InputPrep, device_inputs, forward_backward
from test_step import batch, ddp_engine, tiny_model

CPU = torch.device("cpu")


def _grads(model, micro: list) -> dict:
    # a ViT image tower: no BatchNorm, whose statistics differ between micro-batches
    eng = ddp_engine(model)
    forward_backward(model, eng, ClipLoss(), device_inputs(micro, InputPrep(CPU, 64), model))
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("k", [2, 4])
def test_accumulation_matches_large_batch(k):
    b = batch(8, seed=1)
    g_big = _grads(tiny_model("tiny-debug-vit"), [b])
    micro = [{"images": b["images"][i::k].contiguous(), "input_ids": b["input_ids"][i::k].contiguous()}
             for i in range(k)]
    # the same samples in the same order as the micro-batches, as one batch
    order = torch.arange(8).view(-1, k).T.reshape(-1)
    g_ref = _grads(tiny_model("tiny-debug-vit"), [{"images": b["images"][order], "input_ids": b["input_ids"][order]}])
    g_small = _grads(tiny_model("tiny-debug-vit"), micro)
    assert set(g_small) == set(g_ref) and len(g_ref) > 50
    for name in g_ref:
        torch.testing.assert_close(g_small[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=name)
    # sanity: the loss is order-invariant, so the reordered big batch has the same gradient
    for name in g_ref:
        torch.testing.assert_close(g_big[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=name)
    assert "logit_scale" in g_ref and g_ref["logit_scale"].abs().item() > 0

