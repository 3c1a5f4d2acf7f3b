"""Text compute that follows the real tokens (data.text_chunks): a batch's captions go
through the text tower in length groups, each cut to its own longest caption, and come
back in batch order. The features, the loss over the whole batch and every parameter's
gradient must be the single padded forward's, for each pooling and engine."""
import itertools
import logging

import pytest
import torch

import phoclip.model as pm
from dist_utils import run_distributed
from phoclip.loss import ClipLoss
from phoclip.model import caption_lengths, create_model, plan_text_chunks, trim_padding

PAD = 1


def _ids(lengths, width=40, vocab=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(4, vocab, (n,), generator=g)
        ids[i, 0], ids[i, n - 1] = 0, 2
    return ids


def _lengths(n, seed=0):
    """Realistic mix: mostly short captions, a few long ones (the width trimming keeps)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.exp(torch.log(torch.tensor(12.0)) + 0.5 * torch.randn(n, generator=g))
            .round().clamp(3, 40).long().tolist())


def test_plan_is_a_permutation_with_groups_cut_to_their_longest_caption():
    ids = _ids(_lengths(64))
    plan = plan_text_chunks(ids, PAD, 4, 8, min_rows=8, chunk_cost=0)
    assert plan is not None and 2 <= len(plan.sizes) <= 4
    assert sorted(plan.order.tolist()) == list(range(64))
    assert torch.equal(plan.order[plan.restore], torch.arange(64))
    assert sum(plan.sizes) == 64 and min(plan.sizes) >= 8
    assert all(w % 8 == 0 or w == ids.shape[1] for w in plan.widths)
    lengths = caption_lengths(ids, PAD)
    for x, w, rows in zip(plan.split(ids), plan.widths, plan.order.split(list(plan.sizes))):
        assert x.shape == (len(rows), w) and x.is_contiguous()
        assert int(lengths[rows].max()) <= w  # no real token is cut
        assert torch.equal(x, ids[rows, :w])
    assert plan.computed_tokens < trim_padding(ids, PAD, 8).numel() * 0.8
    # merge puts each group's rows back in batch order
    row_of = torch.arange(64)[:, None].expand(64, ids.shape[1])
    assert torch.equal(plan.merge([x[:, 0] for x in plan.split(row_of)]), torch.arange(64))


def test_plan_is_optimal_against_brute_force():
    """The candidate cut points lose nothing: every split of the sorted rows into at most
    3 groups of >= min_rows, searched exhaustively, costs no less."""
    for seed in range(12):
        lengths = _lengths(30, seed)
        ids = _ids(lengths)
        for mult, min_rows, cost in ((8, 4, 0), (1, 3, 0), (4, 5, 20), (8, 4, 60)):
            w = sorted(min(-(-n // mult) * mult, 40) for n in lengths)
            best = 30 * w[-1] + cost
            for g in (2, 3):
                for cuts in itertools.combinations(range(1, 30), g - 1):
                    b = (0, *cuts, 30)
                    if min(y - x for x, y in zip(b, b[1:])) < min_rows:
                        continue
                    best = min(best, sum((y - x) * w[y - 1] for x, y in zip(b, b[1:])) + cost * g)
            plan = plan_text_chunks(ids, PAD, 3, mult, min_rows, cost)
            got = 30 * w[-1] + cost if plan is None else plan.computed_tokens + cost * len(plan.sizes)
            assert got == best, (seed, mult, min_rows, cost, plan)


def test_no_split_where_it_cannot_pay():
    ids = _ids(_lengths(64))
    assert plan_text_chunks(ids, PAD, 4, device="cpu") is not None
    assert plan_text_chunks(ids[:32], PAD, 4, device="cuda") is None  # a GPU forward's fixed cost
    assert plan_text_chunks(ids, PAD, 1) is None  # off
    assert plan_text_chunks(ids, PAD, 0) is None
    assert plan_text_chunks(ids[:15], PAD, 4, min_rows=8) is None  # too few rows for two groups
    assert plan_text_chunks(_ids([9] * 64), PAD, 4, chunk_cost=0) is None  # one width
    assert plan_text_chunks(ids, PAD, 4, chunk_cost=10 ** 6) is None  # an extra forward costs more
    assert plan_text_chunks(torch.zeros(0, 40, dtype=torch.long), PAD, 4) is None


def _model(pooling):
    torch.manual_seed(0)
    return create_model("tiny-debug", text={"pooling": pooling, "hf_config": {"vocab_size": 100}})


def _loss_and_grads(model, images, ids, chunks):
    model.zero_grad(set_to_none=True)
    out = model(images, ids, chunks)
    loss = ClipLoss()(**out)["contrastive_loss"]
    loss.backward()
    return out["text_features"].detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                          if p.grad is not None}


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_chunked_text_tower_gives_the_padded_features_loss_and_gradients(pooling):
    """Padded to 40, trimmed, and in length groups: the same text features, the same
    contrastive loss over the whole batch and the same gradient on every parameter."""
    model = _model(pooling).train()
    ids = _ids(_lengths(48))
    images = torch.randn(48, 3, 32, 32)
    plan = plan_text_chunks(trim_padding(ids, PAD, 8), PAD, 4, 8, min_rows=4, chunk_cost=0)
    assert plan is not None and len(plan.sizes) >= 3
    (f_pad, l_pad, g_pad), (f_ch, l_ch, g_ch) = (_loss_and_grads(model, images, ids, None),
                                                 _loss_and_grads(model, images, trim_padding(ids, PAD, 8), plan))
    torch.testing.assert_close(f_ch, f_pad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l_ch, l_pad, rtol=1e-5, atol=1e-6)
    assert set(g_pad) == set(g_ch) and len(g_pad) > 30
    for n in g_pad:
        torch.testing.assert_close(g_ch[n], g_pad[n], rtol=1e-4, atol=1e-5, msg=n)
    # without gradient too (evaluation), and the plan may live on the ids' device already
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(ids, chunks=plan.to("cpu")), model.encode_text(ids),
                                   rtol=1e-5, atol=1e-6)


def test_chunked_text_tower_in_bf16_close_to_one_forward():
    """bf16 autocast: the weight casts are cached, so each weight's gradient is summed
    over the groups in bf16 - a few more roundings than one forward's single GEMM, well
    inside bf16's own error (the same check as fp32 vs bf16 in test_model)."""
    model = _model("mean").train()
    ids = _ids(_lengths(48, 4))
    images = torch.randn(48, 3, 32, 32)
    plan = plan_text_chunks(trim_padding(ids, PAD, 8), PAD, 6, 8, min_rows=4, chunk_cost=0)
    assert plan is not None and len(plan.sizes) >= 3
    grads = []
    for x, chunks in ((ids, None), (trim_padding(ids, PAD, 8), plan)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss, g = _loss_and_grads(model, images, x, chunks)
        grads.append(torch.cat([v.flatten().float() for _, v in sorted(g.items())]))
    assert torch.isfinite(grads[1]).all()
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.999


def test_chunked_text_tower_under_grad_checkpointing():
    model = _model("cls").train()
    ids = _ids(_lengths(32, 3))
    images = torch.randn(32, 3, 32, 32)
    plan = plan_text_chunks(ids, PAD, 4, 8, min_rows=4, chunk_cost=0)
    ref = _loss_and_grads(model, images, ids, None)[2]
    model.set_grad_checkpointing(True)
    got = _loss_and_grads(model, images, ids, plan)[2]
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-5, msg=n)


def _ddp_worker(rank, world, pooling):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _model(pooling).train()
    ddp = DDP(model)
    ids = _ids(_lengths(32, seed=rank))  # each rank its own captions
    images = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(rank))
    plan = plan_text_chunks(trim_padding(ids, PAD, 8), PAD, 4, 8, min_rows=4, chunk_cost=0)
    assert plan is not None and len(plan.sizes) >= 2
    loss_fn = ClipLoss(rank=rank, world_size=world)  # negatives from both ranks
    grads = []
    for x, chunks in ((ids, None), (trim_padding(ids, PAD, 8), plan)):
        model.zero_grad(set_to_none=True)
        loss = loss_fn(**ddp(images, x, chunks))["contrastive_loss"]
        loss.backward()  # DDP averages the gradients over the ranks
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert len(grads[0]) > 30 and set(grads[0]) == set(grads[1])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_ddp_two_ranks_same_gradients(pooling):
    run_distributed(_ddp_worker, 2, (pooling,))


def _deepspeed_worker(rank, world, stage):
    import os

    import deepspeed

    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    results = []
    for chunked in (False, True):
        model = _model("mean").train()
        cfg = {"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 1,
               # threshold 0: ZeRO-3 partitions even this tiny model's weights, so every
               # group's forward gathers them (both ranks plan the same number of groups)
               "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
               "zero_allow_untested_optimizer": True,
               "gradient_clipping": 0.0}
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                          config=cfg)
        ids = _ids(_lengths(16), seed=rank)  # same lengths, other tokens on each rank
        images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(rank))
        plan = plan_text_chunks(trim_padding(ids, PAD, 8), PAD, 4, 8, min_rows=4, chunk_cost=0)
        assert plan is not None and len(plan.sizes) >= 2
        x, chunks = (trim_padding(ids, PAD, 8), plan) if chunked else (ids, None)
        loss = ClipLoss(rank=rank, world_size=world)(**engine(images, x, chunks))["contrastive_loss"]
        engine.backward(loss)
        engine.step()  # SGD with lr 1: the step is the gradient
        with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=stage == 3):
            results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    before = {n: p.detach() for n, p in _model("mean").named_parameters()}
    moved = sum(not torch.equal(before[n], results[0][n]) for n in before)
    assert moved > 30
    for n in results[0]:
        torch.testing.assert_close(results[1][n], results[0][n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_same_step(stage):
    """ZeRO-2 and ZeRO-3 (2 gloo ranks, fp32, SGD with lr 1): the step made from the
    chunked forward is the padded forward's. The trainer still runs one forward under
    ZeRO-3: there every forward gathers the weights, so ranks would have to agree on
    the number of groups, and each group costs one more gather of the whole tower."""
    pytest.importorskip("deepspeed")
    run_distributed(_deepspeed_worker, 2, (stage,))


def test_trainer_chunks_give_the_same_steps(shapes_shards, tmp_path, monkeypatch):
    """The trainer plans groups on the CPU ids and its steps (losses over two steps, so
    the first step's gradients count) equal one forward's; a step between reads still
    reads nothing from the device; under ZeRO-3 it plans none."""
    from test_throughput import _SyncCounter, _trainer

    monkeypatch.setattr(pm, "CHUNK_COST_TOKENS", {"cpu": 0, "cuda": 0})
    monkeypatch.setattr(pm, "CHUNK_MIN_ROWS", 2)
    losses, used = {}, {}
    for k in (1, 4):
        tr = _trainer(shapes_shards, tmp_path / str(k), **{"data.text_chunks": k, "data.trim_padding": 1,
                                                           "data.batch_size": 16})
        it = iter(tr.stream)
        batches = [next(it) for _ in range(2)]
        used[k] = [tr.device_inputs([b])[0][2] for b in batches]
        losses[k] = [tr.train_step([b])["loss"] for b in batches]
        if k == 4:
            b = next(it)
            assert tr.device_inputs([b])[0][2] is not None
            with _SyncCounter() as sc:
                assert tr.train_step([b], sync=False) == {"_stop": False}
            assert sc.ours == [], sc.ours
            tr.engine.partitioned = True  # as ZeRO-3 reports it
            assert tr.device_inputs(batches[:1])[0][2] is None
        tr.close()
    assert used[1] == [None, None] and all(c is not None and len(c.sizes) >= 2 for c in used[4])
    assert losses[4] == pytest.approx(losses[1], rel=1e-5)


def test_evaluation_embeds_the_same_in_groups(monkeypatch):
    from phoclip.retrieval import embed_samples

    monkeypatch.setattr(pm, "CHUNK_COST_TOKENS", {"cpu": 0, "cuda": 0})
    monkeypatch.setattr(pm, "CHUNK_MIN_ROWS", 2)
    model = _model("cls")
    lengths = _lengths(40, 5)
    samples = [{"key": str(i), "image": torch.randn(3, 64, 64), "ids": _ids(lengths[4 * i:4 * i + 4], seed=i)}
               for i in range(10)]
    calls = []
    real = model.encode_text
    monkeypatch.setattr(model, "encode_text", lambda x, *a, **k: calls.append(x.shape) or real(x, *a, **k))
    one = embed_samples(model, samples, torch.device("cpu"), batch_size=10, text_chunks=1)
    n_one = len(calls)
    grouped = embed_samples(model, samples, torch.device("cpu"), batch_size=10, text_chunks=4)
    assert n_one == 1 and len(calls) - n_one >= 2
    torch.testing.assert_close(grouped[1], one[1], rtol=1e-5, atol=1e-6)
    assert torch.equal(grouped[2], one[2])


@pytest.mark.slow
def test_compiled_text_tower_in_groups_matches_eager_with_few_graphs():
    """train.compile: groups of varying rows and widths compile a bounded number of
    graphs (static, then dynamic sizes), with the eager features and gradients."""
    from phoclip_train.build import compile_stats

    torch._dynamo.reset()
    eager, compiled = _model("mean").train(), _model("mean").train()
    compiled.text.compile()
    shapes = set()
    for seed in range(4):
        ids = trim_padding(_ids(_lengths(48, seed), seed=seed), PAD, 8)
        plan = plan_text_chunks(ids, PAD, 4, 8, min_rows=4, chunk_cost=0)
        shapes.update(tuple(x.shape) for x in plan.split(ids))
        images = torch.randn(48, 3, 32, 32)
        (f_e, _, g_e), (f_c, _, g_c) = (_loss_and_grads(m, images, ids, plan) for m in (eager, compiled))
        torch.testing.assert_close(f_c, f_e, rtol=1e-4, atol=1e-5)
        for n in g_e:
            torch.testing.assert_close(g_c[n], g_e[n], rtol=1e-3, atol=1e-4, msg=n)
    stats = compile_stats()
    logging.getLogger(__name__).info("compile: %s for %d group shapes", stats, len(shapes))
    assert len(shapes) >= 8, shapes
    assert stats["graphs"] <= 4, (stats, shapes)
