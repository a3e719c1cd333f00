"""Held-out accuracy against visual tokens per video on the needle (synthetic v3): more frames, STAB's
temporal compression switches, and the token budget. README.md in this folder says what was run.

    .venv/bin/python experiments/needle/study.py run --seeds 0 1          # every arm, one after another
    .venv/bin/python experiments/needle/study.py run --seeds 1 --arms f8 f16  # some arms only
    .venv/bin/python experiments/needle/study.py collect                  # table + plot from the runs

``run`` trains each (arm, seed) with ``train.py`` into ``outputs/needle/<arm>/seed<k>`` (skipping
those with a summary.json), then copies the small files the table comes from into ``runs/<arm>/seed<k>/``
of this folder: ``summary.json`` (the loss history dropped), ``overrides.txt`` (the exact command),
``correct.json`` (question id -> 1/0 from ``heldout/judgements.jsonl``) and ``tokens.json`` (visual
tokens and frames per held-out video, measured: STAB's output for the first held-out videos, through
the run's own frame pipeline and checkpoint).

``collect`` writes ``results.csv`` (one row per run), ``results.md`` (per arm: visual tokens, frames,
accuracy per question kind with a 95% bootstrap interval over held-out questions and a 95% t interval
over seeds, train time) and ``accuracy_vs_tokens.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
RUNS = os.path.join(HERE, "runs")
OUT = os.path.join(REPO, "outputs", "needle")
PY = os.path.join(REPO, ".venv", "bin", "python")
sys.path.insert(0, REPO)

DATA = "data_cache/needle_56"
STEPS = 400
# every run: the needle preset at 56 px (clips and STAB canvas: a 2x2 grid of spatial tokens, 7 tokens a frame),
# batch 8, a fixed number of steps, one thread
COMMON = [
    "data=needle", f"data.root={DATA}", "data.synthetic.needle_side=56", "stab.resolution=56",
    "data.batch_size=8", "trainer.max_epochs=1000", f"trainer.max_steps={STEPS}", "stage.lr=3e-3",
    "trainer.cpu_threads=1", "trainer.enable_progress_bar=false", "trainer.checkpoint_every_n_steps=100000",
    "logger.val_every_n_steps=0",
]
BUDGET = ["data.sampling=budget"]
# arm -> (group, overrides); the group is the line the arm belongs to in the plot
ARMS = {
    "f8": ("frames", ["frames=8"]),
    "f16": ("frames", ["frames=16"]),
    "f32": ("frames", ["frames=32"]),
    "f32_merge0.25": ("merge_keep=0.25", ["frames=32", "stab.merge_keep=0.25"]),
    "f32_pool4": ("temporal_pool=4", ["frames=32", "stab.temporal_pool=4"]),
    "budget168": ("budget", BUDGET + ["data.max_visual_tokens=168"]),
    "budget336": ("budget", BUDGET + ["data.max_visual_tokens=336"]),
    "budget224_merge0.25": ("budget + merge_keep=0.25", BUDGET + ["data.max_visual_tokens=224", "stab.merge_keep=0.25"]),
    "budget224_pool4": ("budget + temporal_pool=4", BUDGET + ["data.max_visual_tokens=224", "stab.temporal_pool=4"]),
}
KINDS = ("flash_colour", "flash_half")
CHANCE = {"flash_colour": 0.25, "flash_half": 0.5}
TOKEN_VIDEOS = 24  # held-out videos whose visual tokens are measured per run (every clip has the same size)


def generate_data() -> None:
    """The study's data root, once (every run finds it made)."""
    from panda.data.synthetic import SyntheticConfig, generate

    generate(SyntheticConfig(version=3, kinds=list(KINDS), num_frames=128, fps=1, needle_side=56), os.path.join(REPO, DATA))


def measure_tokens(run_dir: str) -> dict:
    """Visual tokens (what STAB + the projector hand the LLM) and frames of the first held-out videos,
    through the run's frame pipeline and checkpoint."""
    import torch

    from panda.build import frame_pipeline
    from panda.loading import load_checkpoint

    loaded = load_checkpoint(os.path.join(run_dir, "checkpoints", "last.ckpt"))
    cfg = loaded.run_config
    pipeline = frame_pipeline(cfg)
    videos = os.path.join(REPO, cfg.data.root, cfg.data.eval_qa, "videos")
    tokens, frames = [], []
    with torch.no_grad():
        for name in sorted(os.listdir(videos))[:TOKEN_VIDEOS]:
            sample = pipeline(os.path.join(videos, name))
            visual = loaded.model.encode_video(sample["pixels"][None], sample["frame_mask"][None])
            tokens.append(int(visual.tokens.shape[0]))
            frames.append(int(sample["pixels"].shape[0]))
    return {"videos": len(tokens), "tokens": tokens, "frames": frames}


def keep_small_files(arm: str, seed: int, run_dir: str, command: list[str]) -> None:
    dest = os.path.join(RUNS, arm, f"seed{seed}")
    os.makedirs(dest, exist_ok=True)
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    summary.pop("train/loss_by_step", None)
    with open(os.path.join(dest, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(dest, "overrides.txt"), "w") as f:
        f.write(" ".join(command[1:]) + "\n")
    correct = {}
    with open(os.path.join(run_dir, "heldout", "judgements.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            correct[row["id"]] = int(row.get("pred") == "yes")
    with open(os.path.join(dest, "correct.json"), "w") as f:
        json.dump(correct, f, indent=0)
    with open(os.path.join(dest, "tokens.json"), "w") as f:
        json.dump(measure_tokens(run_dir), f)


def run(arms: list[str], seeds: list[int]) -> None:
    generate_data()
    for seed in seeds:  # seeds outside: a study cut short holds whole seeds
        for arm in arms:
            run_dir = os.path.join(OUT, arm, f"seed{seed}")
            command = [PY, "train.py", *COMMON, *ARMS[arm][1], f"seed={seed}", f"hydra.run.dir={run_dir}"]
            if not os.path.exists(os.path.join(run_dir, "summary.json")):
                os.makedirs(run_dir, exist_ok=True)
                start = time.time()
                print(f"[{time.strftime('%H:%M:%S')}] {arm} seed {seed}: {' '.join(command[2:])}", flush=True)
                with open(os.path.join(run_dir, "stdout.log"), "w") as log:
                    code = subprocess.call(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
                print(f"[{time.strftime('%H:%M:%S')}] {arm} seed {seed}: exit {code} after {time.time() - start:.0f} s",
                      flush=True)
                if code:
                    continue
            keep_small_files(arm, seed, run_dir, command)


# ---------------------------------------------------------------------------------------------- collect
def _runs() -> list[dict]:
    rows = []
    for arm in ARMS:
        folder = os.path.join(RUNS, arm)
        for seed_dir in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            d = os.path.join(folder, seed_dir)
            with open(os.path.join(d, "summary.json")) as f:
                s = json.load(f)
            with open(os.path.join(d, "correct.json")) as f:
                correct = json.load(f)
            with open(os.path.join(d, "tokens.json")) as f:
                tok = json.load(f)
            rows.append({"arm": arm, "group": ARMS[arm][0], "seed": int(seed_dir[4:]), "summary": s, "correct": correct,
                         "tokens": statistics.fmean(tok["tokens"]), "frames": statistics.fmean(tok["frames"]),
                         "fit_s": s.get("time/fit_s"), "wall_s": s.get("time/wall_s"), "steps": s.get("train/steps"),
                         "git_commit": s.get("git_commit"),
                         **{k: s.get(f"eval/accuracy_{k}") for k in KINDS}})
    return rows


def _question_interval(runs: list[dict], kind: str) -> list[float] | None:
    """95% bootstrap interval over held-out questions of the seed-mean accuracy: each question's
    correctness averaged over the arm's seeds, questions resampled (2000 resamples, seed 0)."""
    from panda.evaluation.benchmarks import bootstrap_ci

    ids = sorted(q for q in runs[0]["correct"] if q.endswith(kind))
    return bootstrap_ci(statistics.fmean(r["correct"][q] for r in runs) for q in ids)


def collect() -> None:
    from panda.experiments.collect import ci95

    rows = _runs()
    if not rows:
        raise SystemExit(f"no runs under {RUNS}: run `study.py run` first")
    with open(os.path.join(HERE, "results.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arm", "seed", "frames", "visual_tokens", *[f"accuracy_{k}" for k in KINDS], "steps", "fit_s",
                    "wall_s", "git_commit"])
        for r in rows:
            w.writerow([r["arm"], r["seed"], r["frames"], r["tokens"], *[r[k] for k in KINDS], r["steps"], r["fit_s"],
                        r["wall_s"], r["git_commit"]])
    arms = []
    for arm in ARMS:
        runs = [r for r in rows if r["arm"] == arm]
        if not runs:
            continue
        entry = {"arm": arm, "group": ARMS[arm][0], "runs": runs, "seeds": [r["seed"] for r in runs],
                 "tokens": statistics.fmean(r["tokens"] for r in runs), "frames": statistics.fmean(r["frames"] for r in runs),
                 "fit_s": statistics.fmean(r["fit_s"] for r in runs)}
        for k in KINDS:
            values = [r[k] for r in runs]
            entry[k] = statistics.fmean(values)
            entry[f"{k}_values"] = values
            entry[f"{k}_questions"] = _question_interval(runs, k)
            entry[f"{k}_seeds"] = ci95(values)
        arms.append(entry)
    write_markdown(arms)
    plot(arms)


def _fmt(entry: dict, kind: str) -> str:
    q, s = entry[f"{kind}_questions"], entry[f"{kind}_seeds"]
    text = f"{entry[kind]:.3f}"
    text += f" [{q[0]:.2f}, {q[1]:.2f}]" if q else ""
    text += f" [{max(0.0, s[0]):.2f}, {min(1.0, s[1]):.2f}]" if s else ""
    return text


def seen_fraction(frames: int, clip: int = 128, event=(2, 4)) -> float:
    """The share of held-out clips whose flash falls on a sampled frame (the release's frame picks,
    every start and length equally likely, as the generator draws them)."""
    from panda.data.video import sample_frame_indices

    picks, seen, total = set(sample_frame_indices(clip, 1, frames, 1.0)), 0, 0
    for length in range(event[0], event[1] + 1):
        for half in (0, 1):
            lo, hi = (0, clip // 2 - length) if half == 0 else (clip // 2, clip - length)
            for start in range(lo, hi + 1):
                total += 1
                seen += any(start <= i < start + length for i in picks)
    return seen / total


def write_markdown(arms: list[dict]) -> None:
    lines = [
        "| arm | visual tokens / video | frames | flash colour (chance 0.25): mean [questions] [seeds] | "
        "flash half (chance 0.5): mean [questions] [seeds] | flash seen | ceiling colour / half | seeds | fit s / run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for a in sorted(arms, key=lambda a: (a["tokens"], a["frames"])):
        seen = seen_fraction(round(a["frames"]))
        ceiling = [seen + (1 - seen) * CHANCE[k] for k in KINDS]
        lines.append(f"| `{a['arm']}` | {a['tokens']:.0f} | {a['frames']:.0f} | {_fmt(a, 'flash_colour')} | "
                     f"{_fmt(a, 'flash_half')} | {seen:.2f} | {ceiling[0]:.2f} / {ceiling[1]:.2f} | {len(a['seeds'])} | "
                     f"{a['fit_s']:.0f} |")
    lines += [
        "",
        "Accuracy: mean over seeds, then [95% bootstrap interval over the 120 held-out questions of the kind, each "
        "question's correctness averaged over the seeds (2000 resamples, seed 0)] and [95% Student t interval over "
        "seeds, clipped to [0, 1]]. Visual tokens and frames: measured, STAB's output for 24 held-out videos per run "
        "through the run's checkpoint and frame pipeline (every clip has the same size, so every video gets the same "
        "count). `flash seen`: the share of held-out clips whose flash falls on a sampled frame, and `ceiling`: the "
        "accuracy of a model that answers right whenever the flash is on a sampled frame and guesses otherwise "
        "(both computed from the frame picks, not measured). `fit s`: training time per run (400 steps), two or "
        "three runs sharing the 2-core machine with other work.",
        "",
        "Per seed:",
        "",
        "| arm | seed | flash colour | flash half | fit s |",
        "|---|---|---|---|---|",
    ]
    for a in arms:
        for r in a["runs"]:
            lines.append(f"| `{a['arm']}` | {r['seed']} | {r['flash_colour']:.3f} | {r['flash_half']:.3f} | {r['fit_s']:.0f} |")
    with open(os.path.join(HERE, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(arms: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.4), sharex=True)
    markers = {"frames": "o", "merge_keep=0.25": "s", "temporal_pool=4": "^", "budget": "D",
               "budget + merge_keep=0.25": "P", "budget + temporal_pool=4": "X"}
    for ax, kind in zip(axes, KINDS):
        for group, marker in markers.items():
            pts = sorted((a for a in arms if a["group"] == group), key=lambda a: a["tokens"])
            if not pts:
                continue
            x = [a["tokens"] for a in pts]
            y = [a[kind] for a in pts]
            lo = [a[kind] - a[f"{kind}_questions"][0] for a in pts]
            hi = [a[f"{kind}_questions"][1] - a[kind] for a in pts]
            ax.errorbar(x, y, yerr=[lo, hi], marker=marker, capsize=3, linestyle="-" if len(pts) > 1 else "none",
                        label=group)
            for a in pts:
                ax.annotate(f"{a['frames']:.0f}f", (a["tokens"], a[kind]), textcoords="offset points", xytext=(5, -11),
                            fontsize=7)
        per_frame = min(a["tokens"] / a["frames"] for a in arms if a["group"] == "frames") if any(
            a["group"] == "frames" for a in arms) else None
        if per_frame:  # what a model that is right whenever a sampled frame shows the flash would score
            counts = list(range(4, 65, 4))
            ceiling = [seen_fraction(f) + (1 - seen_fraction(f)) * CHANCE[kind] for f in counts]
            ax.plot([f * per_frame for f in counts], ceiling, color="grey", linestyle="--", linewidth=1,
                    label="ceiling, uncompressed frames (computed)")
        ax.axhline(CHANCE[kind], color="grey", linestyle=":", linewidth=1, label="chance")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("visual tokens per video (log scale)")
        ax.set_ylabel("held-out accuracy")
        ax.set_title({"flash_colour": "what colour was the flash?", "flash_half": "in which half?"}[kind])
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.suptitle("Needle in a 128-frame video: accuracy vs visual tokens (mean over seeds, 95% bootstrap over questions; "
                 "label = frames)", fontsize=9)
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    fig.savefig(os.path.join(HERE, "accuracy_vs_tokens.png"), dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    r.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    sub.add_parser("collect")
    args = parser.parse_args()
    if args.command == "run":
        run(args.arms, args.seeds)
    else:
        collect()


if __name__ == "__main__":
    main()
