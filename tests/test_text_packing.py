"""Text compute that follows the real tokens (data.pack_captions): a batch's captions are
packed end to end into rows, one text-tower forward, a block-diagonal attention mask and
each caption's own position ids. The features, the loss over the whole batch and every
parameter's gradient must be the padded forward's, for each pooling and engine."""
import logging

import pytest
import torch

from conftest import padded_ids
from dist_utils import run_distributed
from phoclip.models.loss import ClipLoss
from phoclip.models.factory import create_model
from phoclip.models.packing import pack_captions, trim_padding

PAD = 1


def _lengths(n, seed=0, median=12.0):
    """Realistic mix: mostly short captions, a few long ones (the width trimming keeps)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.exp(torch.log(torch.tensor(median)) + 0.5 * torch.randn(n, generator=g))
            .round().clamp(3, 40).long().tolist())


def test_packing_puts_each_caption_whole_in_one_row():
    ids = padded_ids(_lengths(64))
    p = pack_captions(ids, PAD, "roberta", row_tokens=64)
    rows, P = p.ids.shape
    assert P == 64 and torch.equal(p.lengths, (ids != PAD).sum(1))
    flat_ids, flat_pos, flat_seg = p.ids.reshape(-1), p.positions.reshape(-1), p.segments.reshape(-1)
    for i, n in enumerate(p.lengths.tolist()):
        slots = p.gather[i, :n]
        assert torch.equal(flat_ids[slots], ids[i, :n])                        # its tokens, in order
        assert torch.equal(flat_pos[slots], torch.arange(n) + PAD + 1)         # its padded row's positions
        assert (flat_seg[slots] == i).all() and len(set((slots // P).tolist())) == 1  # one row
        assert torch.equal(slots, slots[0] + torch.arange(n))                  # contiguous
        assert (p.gather[i, n:] == rows * P).all()                             # the rest: the zero slot
    assert int((flat_seg >= 0).sum()) == int(p.lengths.sum())                  # nothing else in the rows
    assert (flat_ids[flat_seg < 0] == PAD).all()
    assert p.computed_tokens < 1.2 * int(p.lengths.sum()) < trim_padding(ids, PAD, 8).numel()
    # a caption longer than the row length widens the rows
    long = padded_ids([90, 5, 7], width=96)
    assert pack_captions(long, PAD, "roberta", row_tokens=64).ids.shape[1] == 96


def test_packing_fills_rows_at_realistic_lengths():
    """PhoBERT caption lengths (median 22, tail to 70) at batch 256: rows as wide as the
    longest caption hold >= 95% real tokens (trimming alone: ~36%)."""
    ids = padded_ids(_lengths(256, 1, median=22.0), width=70, vocab=1000)
    p = pack_captions(ids, PAD)
    assert int(p.lengths.sum()) / p.computed_tokens > 0.95


def _model(pooling, attn="sdpa", **hf_config):
    torch.manual_seed(0)
    return create_model("tiny-debug", text={"pooling": pooling, "attn_implementation": attn,
                                            "hf_config": {"vocab_size": 100, **hf_config}})


def _loss_and_grads(model, images, ids, packing):
    model.zero_grad(set_to_none=True)
    out = model(images, ids, packing)
    loss = ClipLoss()(**out)["contrastive_loss"]
    loss.backward()
    return out["text_features"].detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                          if p.grad is not None}


def _assert_same(a, b):
    (f0, l0, g0), (f1, l1, g1) = a, b
    torch.testing.assert_close(f1, f0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    assert set(g0) == set(g1) and len(g0) > 30
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_packed_text_tower_gives_the_padded_features_loss_and_gradients(pooling, attn):
    """Padded to 40 vs packed into rows: the same text features, the same contrastive
    loss over the whole batch and the same gradient on every parameter (SDPA and eager
    attention: both take the block-diagonal mask)."""
    model = _model(pooling, attn).train()
    assert model.text.config._attn_implementation == attn
    ids = padded_ids(_lengths(48))
    images = torch.randn(48, 3, 32, 32)
    packing = model.pack_text(ids)
    assert packing is not None and packing.computed_tokens < 0.5 * ids.numel()
    _assert_same(_loss_and_grads(model, images, ids, None), _loss_and_grads(model, images, ids, packing))
    model.eval()  # without gradient too (evaluation)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(ids, packing=packing), model.encode_text(ids),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("model_type", ["roberta", "bert"])
def test_pads_inside_captions_stay_pads(pooling, model_type):
    """Hostile ids: a pad inside a caption, a caption that starts with one. Packed, each
    is what it is in the padded row (not a key, not pooled, its position id)."""
    model = _model(pooling, model_type=model_type).train()
    ids = padded_ids(_lengths(24, 6))
    ids[0, 3], ids[1, 0], ids[2, 1:3] = PAD, PAD, PAD
    images = torch.randn(24, 3, 32, 32)
    _assert_same(_loss_and_grads(model, images, ids, None), _loss_and_grads(model, images, ids, model.pack_text(ids)))


def test_bert_tower_packs_exactly_and_relative_positions_do_not_pack():
    """BERT numbers positions from 0 (RoBERTa after the padding index): packing follows
    the tower; a tower with relative positions gets no packing (the trimmed batch)."""
    model = _model("mean", model_type="bert").train()
    assert type(model.text).__name__ == "BertModel"
    ids = padded_ids(_lengths(32, 2))
    packing = model.pack_text(ids)
    assert packing is not None and int(packing.positions.min()) == 0
    images = torch.randn(32, 3, 32, 32)
    _assert_same(_loss_and_grads(model, images, ids, None), _loss_and_grads(model, images, ids, packing))
    rel = _model("cls", model_type="bert", position_embedding_type="relative_key")
    assert rel.pack_text(ids) is None


def test_no_packing_where_it_saves_little():
    model = _model("cls")
    assert model.pack_text(padded_ids([20] * 16, width=24)) is None  # one length: rows as many as captions
    assert model.pack_text(padded_ids([20] * 16, width=40)) is not None  # untrimmed: packing trims them
    assert model.pack_text(torch.zeros(0, 40, dtype=torch.long)) is None


def test_packed_text_tower_under_grad_checkpointing():
    model = _model("cls").train()
    ids = padded_ids(_lengths(32, 3))
    images = torch.randn(32, 3, 32, 32)
    ref = _loss_and_grads(model, images, ids, None)
    model.set_grad_checkpointing(True)
    _assert_same(ref, _loss_and_grads(model, images, ids, model.pack_text(ids)))


def test_packed_text_tower_in_bf16_close_to_the_padded_batch():
    """bf16 autocast: packed and padded differ only by bf16 rounding, and are as close to
    the fp32 gradients as each other (the fp32-vs-bf16 check of test_model)."""
    model = _model("mean").train()
    ids = padded_ids(_lengths(48, 4))
    images = torch.randn(48, 3, 32, 32)
    grads = {}
    for name, packing, bf16 in (("fp32", None, False), ("padded", None, True), ("packed", model.pack_text(ids), True)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            g = _loss_and_grads(model, images, ids, packing)[2]
        grads[name] = torch.cat([v.flatten().float() for _, v in sorted(g.items())])
    cos = lambda a, b: float(torch.nn.functional.cosine_similarity(grads[a], grads[b], dim=0))  # noqa: E731
    assert cos("padded", "packed") > 0.999
    assert abs(cos("fp32", "packed") - cos("fp32", "padded")) < 2e-3


def _ddp_worker(rank, world, pooling):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _model(pooling).train()
    ddp = DDP(model)
    ids = padded_ids(_lengths(32, seed=rank))  # each rank its own captions (and number of rows)
    images = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(rank))
    loss_fn = ClipLoss(rank=rank, world_size=world)  # negatives from both ranks
    grads = []
    for packing in (None, model.pack_text(ids)):
        model.zero_grad(set_to_none=True)
        loss_fn(**ddp(images, ids, packing))["contrastive_loss"].backward()  # DDP averages over ranks
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert len(grads[0]) > 30 and set(grads[0]) == set(grads[1])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.slow  # two spawned processes (make test runs it)
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_ddp_two_ranks_same_gradients(pooling):
    run_distributed(_ddp_worker, 2, (pooling,))


def _deepspeed_worker(rank, world, stage):
    import os

    import deepspeed

    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    results = []
    for packed in (False, True):
        model = _model("mean").train()
        cfg = {"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 1,
               # threshold 0: ZeRO-3 partitions even this tiny model's weights, so the
               # forward gathers them (each rank its own number of packed rows)
               "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
               "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0}
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                          config=cfg)
        ids = padded_ids(_lengths(16, seed=rank))
        images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(rank))
        packing = model.pack_text(ids) if packed else None
        loss = ClipLoss(rank=rank, world_size=world)(**engine(images, ids, packing))["contrastive_loss"]
        engine.backward(loss)
        engine.step()  # SGD with lr 1: the step is the gradient
        with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=stage == 3):
            results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    before = {n: p.detach() for n, p in _model("mean").named_parameters()}
    assert sum(not torch.equal(before[n], results[0][n]) for n in before) > 30
    for n in results[0]:
        torch.testing.assert_close(results[1][n], results[0][n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_same_step(stage):
    """ZeRO-2 and ZeRO-3 (2 gloo ranks, fp32, SGD with lr 1): the step made from the
    packed forward is the padded forward's; one forward either way, so ZeRO-3's
    per-forward gathers are as many and the ranks stay in step."""
    pytest.importorskip("deepspeed")
    run_distributed(_deepspeed_worker, 2, (stage,))


def test_trainer_packs_and_steps_as_padded(shapes_shards, tmp_path):
    """The trainer packs the CPU ids; its losses over two steps (the first step's
    gradients count in the second) equal the unpacked trainer's; a step between reads
    still reads nothing from the device."""
    from test_throughput import _SyncCounter, _trainer

    losses, used = {}, {}
    for pack in (False, True):
        tr = _trainer(shapes_shards, tmp_path / str(pack), **{"data.pack_captions": pack, "data.batch_size": 16})
        it = iter(tr.stream)
        batches = [next(it) for _ in range(2)]
        used[pack] = [tr.device_inputs([b])[0][2] for b in batches]
        losses[pack] = [tr.train_step([b])["loss"] for b in batches]
        if pack:
            with _SyncCounter() as sc:
                assert tr.train_step([next(it)], sync=False) == {}
            assert sc.ours == [], sc.ours
        tr.close()
    assert used[False] == [None, None] and all(p is not None for p in used[True])
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_evaluation_embeds_the_same_packed():
    from phoclip.evaluation.retrieval import embed_samples

    model = _model("cls")
    lengths = _lengths(40, 5)
    samples = [{"key": str(i), "image": torch.randn(3, 64, 64), "ids": padded_ids(lengths[4 * i:4 * i + 4], seed=i)}
               for i in range(10)]
    calls = []
    real = model.encode_text
    model.encode_text = lambda x, *a, **k: calls.append(k.get("packing")) or real(x, *a, **k)
    plain = embed_samples(model, samples, torch.device("cpu"), batch_size=10, pack_captions=False)
    packed = embed_samples(model, samples, torch.device("cpu"), batch_size=10)
    assert calls[0] is None and calls[1] is not None
    torch.testing.assert_close(packed[1], plain[1], rtol=1e-5, atol=1e-6)
    assert torch.equal(packed[2], plain[2])


@pytest.mark.slow
def test_compiled_text_tower_packed_matches_eager_with_few_graphs():
    """train.compile: packed batches of different row counts compile a bounded number of
    graphs (static, then a dynamic row count), with the eager features and gradients."""
    from phoclip_train.build import compile_stats

    torch._dynamo.reset()
    eager, compiled = _model("mean").train(), _model("mean").train()
    compiled.text.compile()
    shapes = set()
    for seed in range(4):
        ids = padded_ids(_lengths(24 + 12 * seed, seed), seed=seed)
        packing = eager.pack_text(ids)
        shapes.add(tuple(packing.ids.shape))
        images = torch.randn(ids.shape[0], 3, 32, 32)
        (f_e, _, g_e), (f_c, _, g_c) = (_loss_and_grads(m, images, ids, packing) for m in (eager, compiled))
        torch.testing.assert_close(f_c, f_e, rtol=1e-4, atol=1e-5)
        for n in g_e:
            torch.testing.assert_close(g_c[n], g_e[n], rtol=1e-3, atol=1e-4, msg=n)
    stats = compile_stats()
    logging.getLogger(__name__).info("compile: %s for %d packed shapes", stats, len(shapes))
    assert len(shapes) >= 3, shapes
    assert stats["graphs"] <= 4, (stats, shapes)
