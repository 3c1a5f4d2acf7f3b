"""One evaluation protocol: a run's validation and phoclip-eval of its export agree to the
last digit on the CPU; caption packing gives every caption its padded-batch feature."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import launch_main, read_metrics, train_args, train_main


def test_run_validation_equals_evaluate_of_the_export(shapes_shards, tmp_path):
    """A bf16-autocast run with a batch size of its own validates in the protocol
    (fp32 weights computed in fp32, the evaluation batch size, packed captions):
    evaluate.py on the exported model over the same shard prints the same numbers."""
    run = tmp_path / "run"
    rc, log = train_main(train_args(shapes_shards, run, **{"train.max_steps": 4, "train.save_every": 4,
                                                           "train.precision": "bf16", "data.batch_size": 6}))
    assert rc == 0, log[-3000:]
    val = read_metrics(run, "val")[4]
    assert launch_main("evaluate", ["--model", run / "model", "--shards", f"{shapes_shards[0]}/val-000000.tar",
                                    "--out", tmp_path / "eval.json"]) == 0
    ev = json.loads((tmp_path / "eval.json").read_text())
    keys = [k for k, v in ev.items() if isinstance(v, float)]
    assert {"t2i_R@5", "i2t_R@5", "t2i_mean_rank", "i2t_mean_rank", "n_images"} <= set(keys)
    assert {k: val[k] for k in keys} == {k: ev[k] for k in keys}


def _tiny(pooling: str):
    from phoclip.models.factory import create_model

    torch.manual_seed(0)
    return create_model("tiny-debug", text={"hf_config": {"vocab_size": 64}, "segmenter": "none",
                                            "pooling": pooling}).eval()


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_a_caption_of_pads_only_packed_with_others_gets_its_padded_feature(pooling):
    """With no key of its own, its one slot attended over the whole packed row (the other
    captions' tokens) under CLS pooling: another feature than the padded batch's."""
    from phoclip.models.packing import pack_captions

    ids = torch.full((6, 16), 1)
    for row, toks in {0: [0, 5, 6, 7, 8, 9, 10, 11, 12, 2], 1: [0, 5, 2], 3: [0, 5, 7, 2], 4: [0, 5, 7, 9, 2]}.items():
        ids[row, :len(toks)] = torch.tensor(toks)
    model = _tiny(pooling)
    with torch.no_grad():
        padded = model.encode_text(ids)
        packed = model.encode_text(ids, packing=pack_captions(ids, model.pad_id))
    torch.testing.assert_close(packed, padded, rtol=0, atol=1e-6)


def test_evaluation_computes_in_the_weights_precision():
    """fp32 weights: no autocast, whatever the run trained in; half weights (a DeepSpeed
    fp16 or bf16 block): their own dtype, the only one they compute in."""
    from phoclip.evaluation.retrieval import weights_dtype

    model = _tiny("cls")
    assert weights_dtype(model) is None
    assert weights_dtype(model.to(torch.bfloat16)) == torch.bfloat16
