"""Host memory of each FSDP rank while it starts from a folder of LLM weights: rank 0 reads them and
sends each rank its shards (``trainer.fsdp.broadcast_from_rank0=true``, the default) against every
rank reading them itself (``false``, the path before that option existed).

    python benchmarks/host_memory.py              # LLaMA folders of ~46M and ~218M parameters
    python benchmarks/host_memory.py --quick      # ~9M and ~46M, for a smoke run

Two local Hugging Face LLaMA folders (bf16 safetensors like Vicuna's half-precision files, 32K
vocabulary, written here, nothing downloaded) of different sizes; for each folder and each path a
real ``train.py`` run with ``llm.pretrained=FOLDER`` and fp32 master weights (``llm.dtype=float32``):
FSDP2 over 2 gloo processes on CPU, one thread each, 3 steps of stage 1
(``stage=prealign``: the LLM frozen, as when stage 1 starts from EVE-7B) on a small generated
dataset. Each rank writes its peak resident set (``VmHWM`` of ``/proc/self/status``) twice: when
training starts (after the build, the sharding and the initial weights: ``start``) and at exit
(``run``). Not ``ru_maxrss``: Lightning starts rank 1 from rank 0's process after rank 0 built its
model, and Linux carries the starting process's peak over into the started one's ``ru_maxrss``.
On CPU the training state (shards, activations, all-gathered units) is host memory too, so ``run``
grows with the model on every rank; on a GPU it is device memory and ``start`` is the host's peak.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_ENV = "PANDA_HOST_MEMORY_OUT"  # set: this module, imported as a plugin by each rank, records its peak RSS there

SIZES = {  # name -> (hidden, layers, intermediate)
    "small": (512, 4, 1376),
    "large": (1024, 12, 2816),
}
QUICK = {"small": (128, 2, 344), "large": (512, 4, 1376)}
VOCAB = 32000


def peak_rss() -> int:
    """This process's peak resident set in bytes since it started (Linux ``VmHWM``)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024  # kB


def _record(phase: str) -> None:
    """This rank's peak resident set so far, in ``$PANDA_HOST_MEMORY_OUT/rank<r>.json`` under ``phase``."""
    rank = int(os.environ.get("LOCAL_RANK", 0))  # unset in the process that starts the others: rank 0
    path = os.path.join(os.environ[OUT_ENV], f"rank{rank}.json")
    found = json.load(open(path)) if os.path.exists(path) else {}
    found[phase] = peak_rss()
    with open(path, "w") as f:
        json.dump(found, f)


def _instrument() -> None:
    """In a training process (imported through ``plugins=[host_memory]``): record the peak when
    training starts and at exit."""
    import atexit

    from panda.training.module import PandaModule

    on_fit_start = PandaModule.on_fit_start

    def recorded(self):
        _record("start")
        on_fit_start(self)

    PandaModule.on_fit_start = recorded
    atexit.register(_record, "run")


if os.environ.get(OUT_ENV) and __name__ != "__main__":
    _instrument()


def llm_folder(folder: str, hidden: int, layers: int, intermediate: int) -> tuple[int, int]:
    """A LLaMA folder of these sizes (random weights, bf16 safetensors); (parameters, file bytes)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64), max_position_embeddings=2048, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))
    return sum(p.numel() for p in model.parameters()), size


def run(folder: str, tokenizer: str, data_root: str, broadcast: bool, workdir: str, name: str) -> dict:
    out = os.path.join(workdir, name)
    os.makedirs(out)
    args = [sys.executable, "train.py", "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "stage=prealign",
            f"llm.pretrained={folder}", "llm.dtype=float32", f"llm.tokenizer={tokenizer}",
            f"trainer.fsdp.broadcast_from_rank0={str(broadcast).lower()}", "trainer.fast_dev_run=3",
            f"data.root={data_root}", "data.synthetic=null", "data.num_workers=0", "data.batch_size=2",
            "logger=none", "evaluate=false", "trainer.enable_progress_bar=false", "plugins=[host_memory]",
            f"hydra.run.dir={os.path.join(out, 'run')}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.dirname(os.path.abspath(__file__)), **{OUT_ENV: out})
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return {r: json.load(open(os.path.join(out, f"rank{r}.json"))) for r in (0, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, REPO)
    from panda.data.synthetic import SyntheticConfig, generate

    mib = 1024 ** 2
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        data_root = generate(SyntheticConfig(train_videos=24, eval_videos=4), os.path.join(workdir, "data"))
        tokenizer = os.path.join(data_root, "tokenizer")
        for size, (hidden, layers, intermediate) in (QUICK if args.quick else SIZES).items():
            folder = os.path.join(workdir, f"llm_{size}")
            params, file_bytes = llm_folder(folder, hidden, layers, intermediate)
            for broadcast in (False, True):
                name = f"{size}_{'broadcast' if broadcast else 'every_rank'}"
                peaks = run(folder, tokenizer, data_root, broadcast, workdir, name)
                rows.append((params, file_bytes, broadcast, peaks))
                print(f"done: {name}", file=sys.stderr, flush=True)
    print("FSDP2, 2 gloo processes on CPU, 1 thread each, stage 1 (LLM frozen), 3 steps; peak RSS per rank in MiB "
          "(start: after build, sharding and initial weights; run: whole run; rank 1 start less its own fp32 half "
          "of the LLM, which on a GPU would be device memory)")
    print(f"{'LLM':>8} {'file MiB':>9}  {'initial weights':<22}{'rank 0 start':>13}{'rank 0 run':>11}"
          f"{'rank 1 start':>13}{'rank 1 run':>11}{'rank 1 start - shard':>22}")
    for params, file_bytes, broadcast, peaks in rows:
        how = "rank 0 reads, sends" if broadcast else "every rank reads"
        shard = params * 4 / 2  # fp32 master weights over 2 ranks
        print(f"{params / 1e6:>7.0f}M {file_bytes / mib:>9.0f}  {how:<22}{peaks[0]['start'] / mib:>13.0f}"
              f"{peaks[0]['run'] / mib:>11.0f}{peaks[1]['start'] / mib:>13.0f}{peaks[1]['run'] / mib:>11.0f}"
              f"{(peaks[1]['start'] - shard) / mib:>22.0f}")


if __name__ == "__main__":
    main()
