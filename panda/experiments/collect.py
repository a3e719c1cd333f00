"""Turn a Hydra ``--multirun`` directory of ``train.py`` runs into a table and plots.

    python -m panda.experiments.collect experiments/ablations_synthetic/multirun --out experiments/ablations_synthetic

Reads only local files (``.hydra/overrides.yaml``, ``.hydra/config.yaml``, ``summary.json``,
``train.log``); no wandb needed. Writes:

- ``results.csv`` — one row per run, **failed runs included** (status ``failed`` and the last error
  line of their log): experiment, variant, frames, seed, accuracies, train wall time, parameter
  counts, git commit;
- ``summary.csv`` and ``summary.md`` — per variant: runs ok / failed, mean ± sample std of each
  accuracy, mean wall time per run; then, per question kind, the mean with its 95% interval over
  seeds (Student t), and each variant against the ``full`` model at the same frame count: the
  difference of means and an exact two-sided permutation p-value over the seeds;
- ``accuracy_by_variant.png`` (one group of bars per frame count, the ``full`` baseline dashed, or a
  note that the sweep lacks it) and ``accuracy_by_frames.png`` (one line per variant run at several
  frame counts) — means, with ±1 std error bars only where there are several seeds; and, when the
  runs report accuracy per question kind, ``accuracy_by_kind.png`` (one bar per kind and variant,
  95% intervals). Each bar is labelled with its mean, so a 0.0 bar shows; where no run gave a value
  there is no bar and the label reads n/a.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import statistics
import sys

import yaml

# overall and per question type of the synthetic benchmarks (v2 adds detail and order)
METRICS = ("accuracy", "accuracy_appearance", "accuracy_motion", "accuracy_detail", "accuracy_order")
COLUMNS = ["job", "experiment", "variant", "frames", "seed", "status", *METRICS, "train_wall_s", "fit_s", "steps",
           "params_stab", "params_total", "git_commit", "run_dir", "error"]


def _overrides(job_dir: str) -> dict[str, str]:
    path = os.path.join(job_dir, ".hydra", "overrides.yaml")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        items = yaml.safe_load(f) or []
    return dict(item.split("=", 1) for item in items if "=" in item)


def _last_error(job_dir: str) -> str:
    for name in ("train.log", "evaluate.log"):
        path = os.path.join(job_dir, name)
        if os.path.exists(path):
            with open(path, errors="replace") as f:
                lines = [line.strip() for line in f if "Error" in line or "error" in line]
            if lines:
                return lines[-1][:300]
    return "no summary.json (the run did not finish)"


def variant_of(experiment: str | None) -> str:
    """``ablation/no_fsra`` -> ``no_fsra``; ``frames/f8`` -> ``full``; none -> ``full``."""
    if not experiment or experiment.startswith("frames/"):
        return "full"
    return experiment.split("/", 1)[1] if "/" in experiment else experiment


def collect_runs(multirun_dir: str) -> list[dict]:
    if not os.path.isdir(multirun_dir):
        raise FileNotFoundError(f"{multirun_dir} is not a directory (pass the hydra.sweep.dir of a --multirun)")
    jobs = sorted((d for d in os.listdir(multirun_dir) if os.path.isdir(os.path.join(multirun_dir, d, ".hydra"))),
                  key=lambda d: (not d.isdigit(), int(d) if d.isdigit() else 0, d))
    if not jobs:
        raise ValueError(f"{multirun_dir} holds no Hydra job directories (no */.hydra)")
    rows = []
    for job in jobs:
        job_dir = os.path.join(multirun_dir, job)
        overrides = _overrides(job_dir)
        with open(os.path.join(job_dir, ".hydra", "config.yaml")) as f:
            config = yaml.safe_load(f)
        experiment = overrides.get("experiment")
        row = {"job": job, "experiment": experiment or "-", "variant": variant_of(experiment),
               "frames": config.get("frames"), "seed": config.get("seed"), "run_dir": os.path.abspath(job_dir)}
        summary_path = os.path.join(job_dir, "summary.json")
        if os.path.exists(summary_path):
            with open(summary_path) as f:
                s = json.load(f)
            row.update(status="ok", train_wall_s=s.get("time/wall_s"), fit_s=s.get("time/fit_s"), steps=s.get("train/steps"),
                       params_stab=s.get("params/stab"), params_total=s.get("params/total"), git_commit=s.get("git_commit"),
                       error="")
            for m in METRICS:
                row[m] = s.get(f"eval/{m}")
        else:
            row.update(status="failed", error=_last_error(job_dir))
        rows.append(row)
    return rows


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample std; the std is None for a single run (one run has no spread to show)."""
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


# two-sided 95% Student t quantiles, degrees of freedom 1..10 (beyond: the normal's 1.96 is within 2%)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def ci95(values: list[float]) -> tuple[float, float] | None:
    """The 95% t interval of the mean over seeds; None for fewer than two runs."""
    if len(values) < 2:
        return None
    mean, sd = statistics.fmean(values), statistics.stdev(values)
    half = (T975[len(values) - 2] if len(values) <= 11 else 1.96) * sd / math.sqrt(len(values))
    return mean - half, mean + half


def permutation_p(a: list[float], b: list[float]) -> float | None:
    """Exact two-sided permutation p-value of ``mean(b) - mean(a)``: the share of the ways to split
    the pooled runs into groups of these sizes whose difference is at least as large (5 vs 5 seeds:
    252 splits, so the smallest p is 2/252 = 0.008)."""
    if len(a) < 2 or len(b) < 2:
        return None
    pooled, n_b = a + b, len(b)
    observed = abs(statistics.fmean(b) - statistics.fmean(a))
    total = sum(pooled)
    hits = count = 0
    for picked in itertools.combinations(range(len(pooled)), n_b):
        sum_b = sum(pooled[i] for i in picked)
        diff = abs(sum_b / n_b - (total - sum_b) / len(a))
        hits += diff >= observed - 1e-12
        count += 1
    return hits / count


def summarise(rows: list[dict]) -> list[dict]:
    """Per (variant, frames): runs ok / failed and mean ± sample std of each accuracy."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["variant"], r["frames"]), []).append(r)
    out = []
    for (variant, frames), rs in sorted(groups.items(), key=lambda g: (g[0][0] != "full", g[0][0], g[0][1] or 0)):
        ok = [r for r in rs if r["status"] == "ok"]
        entry = {"variant": variant, "frames": frames, "runs_ok": len(ok), "runs_failed": len(rs) - len(ok)}
        for m in METRICS:
            vals = [float(r[m]) for r in ok if r.get(m) is not None]
            entry[f"{m}_mean"], entry[f"{m}_std"] = _mean_std(vals)
            entry[f"{m}_values"] = vals
            entry[f"{m}_ci95"] = ci95(vals)
        out.append(entry)
    return out


def comparisons(summary: list[dict]) -> list[dict]:
    """Each variant against the baseline at the same frame count, per metric: difference of means
    and the permutation p-value over seeds."""
    base = {s["frames"]: s for s in summary if s["variant"] == BASELINE}
    out = []
    for s in summary:
        b = base.get(s["frames"])
        if s["variant"] == BASELINE or b is None:
            continue
        entry = {"variant": s["variant"], "frames": s["frames"]}
        for m in METRICS:
            va, vb = b[f"{m}_values"], s[f"{m}_values"]
            entry[f"{m}_diff"] = statistics.fmean(vb) - statistics.fmean(va) if va and vb else None
            entry[f"{m}_p"] = permutation_p(va, vb)
        out.append(entry)
    return out


def _metrics_present(summary: list[dict]) -> list[str]:
    return [m for m in METRICS if any(s[f"{m}_mean"] is not None for s in summary)]


def interval_markdown(summary: list[dict]) -> str:
    """Per question kind: mean [95% interval] over seeds, and the variants against the baseline."""
    metrics = _metrics_present(summary)
    names = [m.replace("accuracy_", "") if m != "accuracy" else "overall" for m in metrics]

    def cell(s, m):
        mean, ci = s[f"{m}_mean"], s[f"{m}_ci95"]
        if mean is None:
            return "–"
        return f"{mean:.3f}" + (f" [{max(0.0, ci[0]):.3f}, {min(1.0, ci[1]):.3f}]" if ci else " (1 run)")

    lines = ["", "Mean over seeds [95% t interval, clipped to [0, 1]]:", "",
             "| variant | frames | n | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for s in summary:
        lines.append(f"| {s['variant']} | {s['frames']} | {s['runs_ok']} | " + " | ".join(cell(s, m) for m in metrics) + " |")
    diffs = comparisons(summary)
    if diffs:
        lines += ["", f"Against `{BASELINE}` at the same frame count: difference of means (exact permutation p over seeds):", "",
                  "| variant | frames | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for d in diffs:
            cells = []
            for m in metrics:
                diff, p = d[f"{m}_diff"], d[f"{m}_p"]
                cells.append("–" if diff is None else f"{diff:+.3f}" + (f" (p={p:.3f})" if p is not None else ""))
            lines.append(f"| {d['variant']} | {d['frames']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(summary: list[dict], rows: list[dict]) -> str:
    """The summary as a markdown table (what a study README embeds)."""
    wall: dict[tuple, list[float]] = {}
    for r in rows:
        if r["status"] == "ok" and r.get("train_wall_s") is not None:
            wall.setdefault((r["variant"], r["frames"]), []).append(float(r["train_wall_s"]))

    def cell(s, m):
        mean, std = s[f"{m}_mean"], s[f"{m}_std"]
        if mean is None:
            return "–"
        return f"{mean:.3f} (1 run)" if std is None else f"{mean:.3f} ± {std:.3f}"

    lines = ["| variant | frames | runs ok / failed | accuracy | motion | appearance | wall s / run |", "|---|---|---|---|---|---|---|"]
    for s in summary:
        w = wall.get((s["variant"], s["frames"]))
        lines.append(f"| {s['variant']} | {s['frames']} | {s['runs_ok']} / {s['runs_failed']} | {cell(s, 'accuracy')} | "
                     f"{cell(s, 'accuracy_motion')} | {cell(s, 'accuracy_appearance')} | {statistics.fmean(w):.0f} |" if w else
                     f"| {s['variant']} | {s['frames']} | {s['runs_ok']} / {s['runs_failed']} | – | – | – | – |")
    return "\n".join(lines) + "\n"


def write_csv(path: str, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})


BASELINE = "full"  # the variant the ablations are compared with (experiment=ablation/full)


def bar_groups(summary: list[dict], metric: str = "accuracy") -> list[tuple]:
    """What ``accuracy_by_variant.png`` draws: ``[(frames, [(variant, mean or None, std or None), ...],
    baseline mean or None), ...]``, one group per frame count, the baseline variant first; a variant
    whose runs at that count all failed (or do not report ``metric``) has mean None."""
    variants = sorted({s["variant"] for s in summary}, key=lambda v: (v != BASELINE, v))
    frame_counts = sorted({s["frames"] for s in summary}, key=lambda f: (f is None, f or 0))
    by_key = {(s["variant"], s["frames"]): s for s in summary}
    return [(f, [(v, by_key[(v, f)][f"{metric}_mean"], by_key[(v, f)][f"{metric}_std"]) for v in variants if (v, f) in by_key],
             by_key[(BASELINE, f)][f"{metric}_mean"] if (BASELINE, f) in by_key else None) for f in frame_counts]


def frame_lines(summary: list[dict], metric: str = "accuracy") -> dict[str, list[tuple]]:
    """What ``accuracy_by_frames.png`` draws: ``{variant: [(frames, mean, std or None), ...]}`` for
    every variant that ran at several frame counts."""
    lines: dict[str, list[tuple]] = {}
    for s in sorted(summary, key=lambda s: s["frames"] or 0):
        if s[f"{metric}_mean"] is not None and s["frames"] is not None:
            lines.setdefault(s["variant"], []).append((s["frames"], s[f"{metric}_mean"], s[f"{metric}_std"]))
    return {v: pts for v, pts in sorted(lines.items(), key=lambda kv: (kv[0] != BASELINE, kv[0])) if len(pts) > 1}


def value_label(mean: float | None) -> str:
    """What a bar says of itself: its mean (a 0.0 bar has no height to see), or n/a where no run
    reported one (no bar is drawn there)."""
    return "n/a" if mean is None else f"{mean:.2f}"


def _draw_bars(ax, xs: list[float], means: list[float | None], width: float, **style) -> None:
    """Bars of ``means`` at ``xs``, each labelled with :func:`value_label` upwards from the axis."""
    ax.bar(xs, [math.nan if m is None else m for m in means], width, **style)
    for x, mean in zip(xs, means):
        ax.text(x, 0.01, value_label(mean), ha="center", va="bottom", rotation=90, fontsize=7)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover
        raise SystemExit("plots need matplotlib: pip install -e '.[dev]'") from exc
    return plt


def _variant_colours(summary: list[dict], metric: str) -> dict:
    """One colour per variant, the same in the variant and the frames plot."""
    cmap = _pyplot().get_cmap("tab10")
    variants = list(dict.fromkeys(v for _, bars, _ in bar_groups(summary, metric) for v, _, _ in bars))
    return {v: cmap(i % 10) for i, v in enumerate(variants)}


def variant_figure(summary: list[dict], metric: str = "accuracy", chance: float | None = None):
    """The figure of ``accuracy_by_variant.png`` (see :func:`plot`); None when no run reports ``metric``."""
    groups = bar_groups(summary, metric)
    if all(mean is None for _, bars, _ in groups for _, mean, _ in bars):
        return None
    plt = _pyplot()
    colours = _variant_colours(summary, metric)
    labelled: set[str] = set()

    def label(name: str) -> str | None:  # each legend entry once
        if name in labelled:
            return None
        labelled.add(name)
        return name

    width = 0.8 / max(len(bars) for _, bars, _ in groups)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * sum(len(b) for _, b, _ in groups) + 3), 3.8))
    for g, (frames, bars, baseline) in enumerate(groups):
        for k, (v, mean, std) in enumerate(bars):
            x = g - 0.4 + width * (k + 0.5)
            _draw_bars(ax, [x], [mean], width * 0.9, color=colours[v], label=label(v))
            if std is not None:
                ax.errorbar(x, mean, yerr=std, color="black", capsize=3, lw=1)
        if baseline is not None:
            ax.hlines(baseline, g - 0.45, g + 0.45, colors="black", linestyles="--", lw=1,
                      label=label(f"baseline ({BASELINE})"))
    if chance is not None:
        ax.axhline(chance, ls=":", c="grey", lw=1, label=f"chance {chance:.2f}")
    ax.set_xticks(range(len(groups)), [f"{f} frames" for f, _, _ in groups])
    ax.set_xlim(-0.5, len(groups) - 0.5)  # an n/a slot draws no bar, so autoscaling would not keep it in view
    ax.set_ylabel(f"held-out {metric}\n(mean; ± std where several seeds)")
    ax.set_ylim(0, 1)
    title = "ablations by frame count" if len(groups) > 1 else f"ablations at {groups[0][0]} frames"
    if all(baseline is None for _, _, baseline in groups):
        title += f"\n(no baseline: experiment=ablation/{BASELINE} is not in this sweep)"
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)  # outside: covers no bar
    fig.tight_layout()
    return fig


def frames_figure(summary: list[dict], metric: str = "accuracy", chance: float | None = None):
    """The figure of ``accuracy_by_frames.png`` (see :func:`plot`); None when no variant ran at
    several frame counts."""
    lines = frame_lines(summary, metric)
    if not lines:
        return None
    plt = _pyplot()
    colours = _variant_colours(summary, metric)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for v, pts in lines.items():
        ax.errorbar([f for f, _, _ in pts], [m for _, m, _ in pts], yerr=[sd or 0.0 for _, _, sd in pts],
                    marker="o", capsize=4, color=colours.get(v), label=v)
    if chance is not None:
        ax.axhline(chance, ls=":", c="grey", lw=1, label=f"chance {chance:.2f}")
    ticks = sorted({f for pts in lines.values() for f, _, _ in pts})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(f) for f in ticks])
    ax.set_xlabel("frames per video")
    ax.set_ylabel(f"held-out {metric}")
    ax.set_ylim(0, 1)
    ax.set_title("by frame count (variants run at several)", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def _save(fig, path: str) -> str:
    fig.savefig(path, dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def plot(summary: list[dict], out_dir: str, metric: str = "accuracy", chance: float | None = None) -> list[str]:
    """``accuracy_by_variant.png``: one group of bars per frame count (the title names the count
    when there is one), one bar per variant labelled with its mean, or n/a where every run failed
    (error bars only where there are several runs), the baseline variant's mean as a dashed line
    in each group (or a note when the sweep has none); ``accuracy_by_frames.png``: one line per
    variant that ran at several frame counts. Legends sit outside the axes."""
    written = []
    for fig, name in ((variant_figure(summary, metric, chance), "accuracy_by_variant.png"),
                      (frames_figure(summary, metric, chance), "accuracy_by_frames.png")):
        if fig is not None:
            written.append(_save(fig, os.path.join(out_dir, name)))
    return written


def kind_plot_frames(summary: list[dict]) -> int | None:
    """The frame count the per-kind plot shows: of those the baseline ran at, the one where the
    most variants ran (a frames sweep adds baseline rows at other counts that hold no ablation);
    ties go to the larger count. None when the baseline never ran."""
    base_frames = {s["frames"] for s in summary if s["variant"] == BASELINE}
    if not base_frames:
        return None
    variants_at = {f: sum(1 for s in summary if s["frames"] == f) for f in base_frames}
    return max(base_frames, key=lambda f: (variants_at[f], f or 0))


def kind_figure(summary: list[dict], chance: float | None = None):
    """The figure of ``accuracy_by_kind.png`` (see :func:`plot_kinds`); None when the runs report no
    per-kind accuracy or the baseline never ran."""
    kinds = [m for m in _metrics_present(summary) if m != "accuracy"]
    frames = kind_plot_frames(summary)
    if not kinds or frames is None:
        return None
    plt = _pyplot()
    rows = [s for s in summary if s["frames"] == frames and s["accuracy_mean"] is not None]
    rows.sort(key=lambda s: (s["variant"] != BASELINE, s["variant"]))
    width = 0.8 / len(kinds)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows) + 2), 3.8))
    for k, m in enumerate(kinds):
        xs = [i - 0.4 + width * (k + 0.5) for i in range(len(rows))]
        _draw_bars(ax, xs, [s[f"{m}_mean"] for s in rows], width * 0.9, label=m.replace("accuracy_", ""),
                   color=plt.get_cmap("tab10")(k))
        for x, s in zip(xs, rows):
            if s[f"{m}_ci95"]:
                lo, hi = max(0.0, s[f"{m}_ci95"][0]), min(1.0, s[f"{m}_ci95"][1])
                mean = s[f"{m}_mean"]
                ax.errorbar(x, mean, yerr=[[mean - lo], [hi - mean]], color="black", capsize=2, lw=0.8)
    if chance is not None:
        ax.axhline(chance, ls=":", c="grey", lw=1, label=f"chance {chance:.2f}")
    ax.set_xticks(range(len(rows)), [s["variant"] for s in rows], rotation=30, ha="right")
    ax.set_xlim(-0.5, len(rows) - 0.5)  # an n/a slot draws no bar, so autoscaling would not keep it in view
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("held-out accuracy\n(mean, 95% interval over seeds)")
    ax.set_title(f"per question kind, {frames} frames", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def plot_kinds(summary: list[dict], out_dir: str, chance: float | None = None) -> str | None:
    """``accuracy_by_kind.png``: at the frame count that holds the most variants beside the baseline
    (:func:`kind_plot_frames`), one group per variant, one bar per question kind labelled with its
    mean (n/a where the variant's runs report none), 95% intervals over seeds as error bars. None
    when the runs report no per-kind accuracy."""
    fig = kind_figure(summary, chance)
    return None if fig is None else _save(fig, os.path.join(out_dir, "accuracy_by_kind.png"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m panda.experiments.collect", description=__doc__.split("\n\n")[0])
    parser.add_argument("multirun_dir")
    parser.add_argument("--out", required=True)
    parser.add_argument("--metric", default="accuracy", choices=METRICS)
    parser.add_argument("--chance", type=float, default=None, help="draw a chance line at this accuracy")
    args = parser.parse_args(argv)
    try:
        rows = collect_runs(args.multirun_dir)
    except (FileNotFoundError, ValueError) as exc:
        print(f"collect: error: {exc}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "results.csv"), rows, COLUMNS)
    summary = summarise(rows)
    cols = ["variant", "frames", "runs_ok", "runs_failed"] + [f"{m}_{k}" for m in METRICS for k in ("mean", "std", "ci95")]
    write_csv(os.path.join(args.out, "summary.csv"), summary, cols)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(markdown(summary, rows) + interval_markdown(summary))
    plots = plot(summary, args.out, args.metric, args.chance)
    by_kind = plot_kinds(summary, args.out, args.chance)
    plots += [by_kind] if by_kind else []
    failed = [r for r in rows if r["status"] != "ok"]
    print(f"{len(rows)} runs ({len(failed)} failed) -> {args.out}/results.csv, summary.csv, {', '.join(os.path.basename(p) for p in plots)}")
    for s in summary:
        mean, std = s[f"{args.metric}_mean"], s[f"{args.metric}_std"]
        shown = "–" if mean is None else (f"{mean:.3f} (1 run)" if std is None else f"{mean:.3f} ± {std:.3f}")
        print(f"  {s['variant']:<16} {s['frames']!s:>3} frames  {args.metric} {shown}  (ok {s['runs_ok']}, failed {s['runs_failed']})")
    for r in failed:
        print(f"  FAILED job {r['job']} ({r['experiment']}, seed {r['seed']}): {r['error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
