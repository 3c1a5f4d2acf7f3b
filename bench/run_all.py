"""Run every CPU benchmark in turn (`make bench`); paste the output into bench/RESULTS.md."""
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for script in ("bench_sharding.py", "bench_loader.py", "bench_trainer.py", "bench_loss.py", "bench_search.py",
               "bench_serve.py", "bench_checkpoint.py", "bench_text_padding.py", "bench_peer_openclip.py"):
    print(f"\n##### {script}", flush=True)
    subprocess.run([sys.executable, str(HERE / script)], check=True)
