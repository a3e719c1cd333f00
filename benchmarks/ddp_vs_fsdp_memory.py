"""Peak memory per rank and throughput of DDP vs FSDP2, 2 CPU processes (gloo), same model and data.

    python benchmarks/ddp_vs_fsdp_memory.py            # ~170M-parameter LLaMA (680 MB fp32) + tiny STAB
    python benchmarks/ddp_vs_fsdp_memory.py --quick    # a smaller model, for a smoke run

Each configuration is a real `train.py` run (Lightning, 2 processes) in a fresh process; peak
memory is the largest resident set of any of its processes (``RUSAGE_CHILDREN``), throughput the
median of the logged ``perf/text_tokens_per_s`` after the first step. DDP keeps a full copy of
parameters, gradients and AdamW state on every rank; FSDP keeps about half of each.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); print('MAXRSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"


def run(name: str, overrides: list[str], workdir: str) -> dict:
    run_dir = os.path.join(workdir, name)
    cmd = [sys.executable, "-c", PROBE, sys.executable, "train.py", *overrides, f"hydra.run.dir={run_dir}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    maxrss_kb = int(proc.stdout.rsplit("MAXRSS", 1)[1].split()[0])
    with open(os.path.join(run_dir, "csv", "metrics.csv")) as f:
        rates = [float(r["perf/text_tokens_per_s"]) for r in csv.DictReader(f) if r.get("perf/text_tokens_per_s")]
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    return {"peak_rss_gb": maxrss_kb / 1024**2, "text_tokens_per_s": statistics.median(rates[1:] or rates),
            "params": summary["params/total"], "steps": summary["train/steps"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    llm = ["llm.hidden_size=512", "llm.layers=4", "llm.heads=8", "llm.intermediate_size=1408"] if args.quick else \
          ["llm.hidden_size=1024", "llm.layers=12", "llm.heads=16", "llm.intermediate_size=2816"]
    common = ["trainer.accelerator=cpu", "trainer.devices=2", f"trainer.max_steps={args.steps}", "trainer.log_every_n_steps=1",
              "logger=csv", "evaluate=false", "data.batch_size=2", "data.num_workers=0", "trainer.enable_progress_bar=false",
              "trainer.checkpoint_every_n_steps=100000", *llm]
    with tempfile.TemporaryDirectory() as workdir:
        results = {
            "ddp": run("ddp", ["trainer=ddp", *common], workdir),
            "fsdp (fp32 compute)": run("fsdp32", ["trainer=fsdp", "trainer.fsdp.param_dtype=null", *common], workdir),
            "fsdp (bf16 compute)": run("fsdp16", ["trainer=fsdp", *common], workdir),
        }
    base = results["ddp"]
    print(f"model: {base['params'] / 1e6:.1f}M parameters, {args.steps} steps, 2 CPU processes (gloo), 1 thread each")
    print(f"{'strategy':<22}{'peak RSS/rank':>16}{'vs ddp':>9}{'text tok/s':>13}{'vs ddp':>9}")
    for name, r in results.items():
        print(f"{name:<22}{r['peak_rss_gb']:>13.2f} GB{r['peak_rss_gb'] / base['peak_rss_gb']:>9.2f}"
              f"{r['text_tokens_per_s']:>13.1f}{r['text_tokens_per_s'] / base['text_tokens_per_s']:>9.2f}")


if __name__ == "__main__":
    main()
