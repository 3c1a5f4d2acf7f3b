"""`make demo`: the whole pipeline, end to end, on the built-in dataset, on CPU.

dataset → tokenizer → make_shards.py → torchrun (2 processes) train_ddp.py →
evaluate.py → build_index.py → search.py (table + HTML gallery)."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from phoclip.data.synthetic import make_dataset
from phoclip.data.text import UndertheseaSegmenter, build_phobert_tokenizer
from phoclip_cli.common import HelpFormatter

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
QUERY = "hai hình tròn màu đỏ ở góc trên bên trái"


def run(cmd: list[str], **kw) -> None:
    print("\n$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, **kw)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", default="demo_out",
                   help="folder for everything the demo makes, relative to the repository root (emptied first)")
    p.add_argument("--images", type=int, default=1200, help="synthetic images to make")
    p.add_argument("--steps", type=int, default=None, help="override train.max_steps")
    p.add_argument("--nproc", type=int, default=2, help="training processes under torchrun")
    args = p.parse_args(argv)
    out = ROOT / args.out
    t0 = time.time()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    # 1. the dataset, in Flickr8k-vi's published format
    caps = make_dataset(out / "data", n_images=args.images)
    print(f"dataset: {args.images} images, captions in {caps}")
    # 2. a PhoBERT-format tokenizer over the dataset's own (segmented) vocabulary
    lines = caps.read_text(encoding="utf-8").splitlines()
    seg = UndertheseaSegmenter().segment([l.split("\t", 1)[1] for l in lines])
    build_phobert_tokenizer(seg, out / "tokenizer")
    # 3. shards
    run([PY, "sharding/make_shards.py", "--source", f"flickr8k-vi:{caps}:{out / 'data' / 'images'}",
         "--out", str(out / "shards"), "--tokenizer", str(out / "tokenizer"),
         "--segmenter", "underthesea", "--max-length", "32", "--image-size", "72",
         "--val-fraction", "0.1", "--shard-size", "300", "--workers", "2"])
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    n_train = len(manifest["shards"]["train"])
    # 4. training: 2 CPU processes under torchrun
    over = [f"run_dir={out / 'run'}", f"model.tokenizer={out / 'tokenizer'}",
            f"data.train_shards={out}/shards/train-{{000000..{n_train - 1:06d}}}.tar",
            f"data.val_shards={out}/shards/val-000000.tar"]
    if args.steps:
        over.append(f"train.max_steps={args.steps}")
    run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
         "launch/train_ddp.py", "--config", "launch/configs/demo.yaml", *over],
        env=dict(os.environ, OMP_NUM_THREADS="1"))
    # 5. evaluation
    run([PY, "launch/evaluate.py", "--model", str(out / "run"), "--shards",
         f"{out}/shards/val-000000.tar", "--out", str(out / "eval.json")])
    # 6. index + search
    run([PY, "launch/build_index.py", "--model", str(out / "run"), "--shards",
         f"{out}/shards/val-000000.tar", "--out", str(out / "index")])
    run([PY, "launch/search.py", "--index", str(out / "index"), QUERY, "--k", "5",
         "--html", str(out / "search.html")])
    res = json.loads((out / "eval.json").read_text())
    from phoclip.evaluation.retrieval import chance_recall  # lazy: imports torch (~2 s); --help answers without it

    n = int(res["n_images"])
    print("\n=== PhoCLIP demo: recall on held-out images (percent) ===")
    for d, name in (("t2i", "text→image"), ("i2t", "image→text")):
        print(f"{name:11} " + "  ".join(f"R@{k} {res[f'{d}_R@{k}']:5.1f} (chance {chance_recall(n, k):4.1f})"
                                        for k in (1, 5, 10)))
    print(f"\ngallery: {out / 'search.html'}")
    print(f"TensorBoard: tensorboard --logdir {out / 'run' / 'tensorboard'}")
    print(f"search service: {PY} launch/serve.py --index {out / 'index'} --port 8080   "
          "(then open http://127.0.0.1:8080/)")
    print(f"done in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
