"""The sweep collector on a fake multirun directory (a failed run must show up as failed), and
every experiment config of the ablation study composes."""

import csv
import importlib.util
import json
import os

import pytest
import yaml
from conftest import compose

from panda.experiments.collect import collect_runs, main, summarise

STUDY = ["ablation/full", "ablation/no_fsra", "ablation/no_gstra", "ablation/no_lste", "ablation/no_temporal",
         "ablation/no_row_tokens", "ablation/lsd_avgpool", "ablation/lsd_before_lste",
         "frames/f1", "frames/f2", "frames/f8", "frames/f16"]


def _job(root, num, experiment, seed, frames, accuracy=None, error=None):
    d = root / str(num)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"experiment={experiment}", f"seed={seed}"]))
    (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"frames": frames, "seed": seed, "name": experiment}))
    if accuracy is not None:
        (d / "summary.json").write_text(json.dumps({
            "eval/accuracy": accuracy, "eval/accuracy_motion": accuracy, "time/wall_s": 60.0 + num, "time/fit_s": 50.0,
            "train/steps": 600, "params/stab": 133266, "params/total": 306898, "git_commit": "abc123"}))
    if error:
        (d / "train.log").write_text(f"[INFO] starting\nRuntimeError: {error}\n")


def test_collector_tables_plots_and_keeps_failed_runs(tmp_path):
    multirun = tmp_path / "multirun"
    _job(multirun, 0, "ablation/full", 0, 4, 0.80)
    _job(multirun, 1, "ablation/full", 1, 4, 0.60)
    _job(multirun, 2, "ablation/no_temporal", 0, 4, 0.25)
    _job(multirun, 3, "ablation/no_temporal", 1, 4, error="out of memory")
    _job(multirun, 4, "frames/f8", 0, 8, 0.90)
    _job(multirun, 10, "frames/f8", 1, 8, 0.70)
    rows = collect_runs(str(multirun))
    assert [r["job"] for r in rows] == ["0", "1", "2", "3", "4", "10"]  # numeric order, the failed run kept
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["variant"] == "no_temporal" and "out of memory" in failed[0]["error"]
    summary = {(s["variant"], s["frames"]): s for s in summarise(rows)}
    full = summary[("full", 4)]
    assert full["runs_ok"] == 2 and full["accuracy_mean"] == pytest.approx(0.70) and full["accuracy_std"] == pytest.approx(0.1414, abs=1e-4)
    assert summary[("no_temporal", 4)]["runs_failed"] == 1 and summary[("no_temporal", 4)]["accuracy_std"] is None
    assert summary[("full", 8)]["accuracy_mean"] == pytest.approx(0.80)
    from panda.experiments.collect import bar_groups, frame_lines

    # every frame count is a group of the variant plot, with the full model's mean as its baseline
    groups = bar_groups(summarise(rows))
    assert [(f, [v for v, _, _ in bars], base) for f, bars, base in groups] == [
        (4, ["full", "no_temporal"], pytest.approx(0.70)), (8, ["full"], pytest.approx(0.80))]
    assert groups[0][1][1][2] is None  # one run of no_temporal: no error bar
    assert list(frame_lines(summarise(rows))) == ["full"]  # the only variant with several frame counts

    out = tmp_path / "out"
    assert main([str(multirun), "--out", str(out), "--chance", "0.25"]) == 0
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 6 and [r["status"] for r in table].count("failed") == 1
    assert table[0]["git_commit"] == "abc123" and table[0]["frames"] == "4" and table[0]["train_wall_s"] == "60.0"
    table_md = (out / "summary.md").read_text()
    assert "| full | 4 | 2 / 0 | 0.700 ± 0.141 |" in table_md and "| no_temporal | 4 | 1 / 1 | 0.250 (1 run) |" in table_md
    assert "± 0.000" not in table_md
    for png in ("accuracy_by_variant.png", "accuracy_by_frames.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([str(tmp_path / "nowhere"), "--out", str(out)]) == 2


def test_variant_plot_without_the_baseline_says_so_and_frames_plot_covers_every_variant(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from panda.experiments import collect

    multirun = tmp_path / "multirun"
    for num, (experiment, frames) in enumerate([("ablation/no_fsra", 4), ("ablation/no_fsra", 8),
                                                ("ablation/no_gstra", 4), ("ablation/no_gstra", 8)]):
        _job(multirun, num, experiment, 0, frames, 0.5 + 0.05 * num)
    summary = collect.summarise(collect.collect_runs(str(multirun)))
    titles, legends = [], []
    savefig = plt.Figure.savefig

    def record(fig, *args, **kwargs):  # what each saved figure says, from the real figure
        ax = fig.axes[0]
        titles.append(ax.get_title())
        legends.append([t.get_text() for t in ax.get_legend().get_texts()])
        return savefig(fig, *args, **kwargs)

    plt.Figure.savefig = record
    try:
        written = collect.plot(summary, str(tmp_path))
    finally:
        plt.Figure.savefig = savefig
    assert [os.path.basename(p) for p in written] == ["accuracy_by_variant.png", "accuracy_by_frames.png"]
    assert "no baseline: experiment=ablation/full is not in this sweep" in titles[0]
    assert legends[1] == ["no_fsra", "no_gstra"]  # one line per variant that ran at several frame counts


def test_bars_show_their_value_a_zero_stays_visible_and_a_missing_one_reads_n_a(tmp_path):
    import matplotlib.pyplot as plt

    from panda.experiments import collect

    multirun = tmp_path / "multirun"
    _job(multirun, 0, "ablation/full", 0, 4, 0.5)
    _job(multirun, 1, "ablation/no_fsra", 0, 4, 0.0)  # a real zero
    _job(multirun, 2, "ablation/no_gstra", 0, 4, error="out of memory")  # no value at all
    summary = collect.summarise(collect.collect_runs(str(multirun)))
    fig = collect.variant_figure(summary)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == ["0.50", "0.00", "n/a"]  # full, no_fsra, no_gstra
    assert ax.get_title() == "ablations at 4 frames"  # one frame count: not "by frame count"
    plt.close(fig)
    _job(multirun, 3, "ablation/full", 0, 8, 0.7)
    fig = collect.variant_figure(collect.summarise(collect.collect_runs(str(multirun))))
    assert fig.axes[0].get_title() == "ablations by frame count"
    plt.close(fig)

    rows = [{"variant": "full", "frames": 4, "status": "ok", "accuracy": 0.5, "accuracy_motion": 0.0, "accuracy_detail": 0.7},
            {"variant": "no_lste", "frames": 4, "status": "ok", "accuracy": 0.3, "accuracy_motion": 0.4}]
    fig = collect.kind_figure(collect.summarise(rows))
    ax = fig.axes[0]
    # per kind (motion, detail), one bar per variant (full, no_lste): no_lste reports no detail accuracy
    assert [t.get_text() for t in ax.texts] == ["0.00", "0.40", "0.70", "n/a"]
    heights = [p.get_height() for p in ax.patches]
    assert heights[:3] == [0.0, 0.4, 0.7] and heights[3] != heights[3]  # no bar (NaN) where there is no value
    plt.close(fig)


@pytest.mark.parametrize("experiment", STUDY)
def test_every_experiment_of_the_study_composes(experiment):
    cfg = compose([f"experiment={experiment}", "seed=2", "data.root=data_cache/synthetic_direction", "data.synthetic.kinds=[direction]"])
    from panda.config import to_train_config

    to_train_config(cfg)
    assert cfg.frames % cfg.stab.chunk_size == 0 and cfg.seed == 2
    if experiment.startswith("frames/"):
        assert cfg.frames == int(experiment.split("/f")[1])


@pytest.mark.slow
def test_joblib_sweep_points_can_use_loader_workers(synthetic_root, tmp_path):
    """Inside joblib's (loky) workers the default start method could not start DataLoader workers;
    panda's loaders fork them there."""
    from conftest import run_cli, tiny_overrides

    overrides = [o for o in tiny_overrides(synthetic_root) if not o.startswith("data.num_workers")]
    run_cli(["train.py", "--multirun", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=1,2", "debug=fast_dev_run",
             "data.num_workers=1", "evaluate=false", f"hydra.sweep.dir={tmp_path}", *overrides])
    assert sorted(p.parent.name for p in tmp_path.glob("*/summary.json")) == ["0", "1"]


@pytest.mark.slow
def test_the_readme_sweep_lands_in_one_folder_that_collect_reads(synthetic_root, tmp_path):
    """``python train.py --multirun experiment=A,B`` as the README writes it (no sweep dir given):
    one folder under multirun/ holds every point, and the collector tabulates it."""
    from conftest import REPO, run_cli, tiny_overrides

    run_cli([os.path.join(REPO, "train.py"), "--multirun", "experiment=ablation/no_fsra,ablation/no_gstra",
             "debug=fast_dev_run", *tiny_overrides(synthetic_root)], cwd=tmp_path)
    (sweep,) = (tmp_path / "multirun").iterdir()
    assert sorted(p.parent.name for p in sweep.glob("*/summary.json")) == ["0", "1"]
    out = tmp_path / "study"
    proc = run_cli(["-m", "panda.experiments.collect", str(sweep), "--out", str(out)], cwd=tmp_path)
    assert "2 runs (0 failed)" in proc.stdout
    variants = {row["variant"] for row in csv.DictReader(open(out / "summary.csv"))}
    assert len(variants) == 2


def test_intervals_and_permutation_p_values_against_the_full_model():
    from panda.experiments.collect import ci95, interval_markdown, permutation_p, summarise

    lo, hi = ci95([0.8, 0.9, 1.0])  # mean 0.9, sd 0.1, t(2) = 4.303
    assert (lo, hi) == (pytest.approx(0.9 - 4.303 * 0.1 / 3 ** 0.5), pytest.approx(0.9 + 4.303 * 0.1 / 3 ** 0.5))
    assert ci95([0.5]) is None
    # 5 vs 5 with no overlap: only the observed split and its mirror are as extreme -> 2 / 252
    assert permutation_p([0.9, 0.91, 0.92, 0.93, 0.94], [0.2, 0.21, 0.22, 0.23, 0.24]) == pytest.approx(2 / 252)
    assert permutation_p([0.5, 0.6, 0.7], [0.5, 0.6, 0.7]) == 1.0
    rows = [{"variant": v, "frames": 4, "status": "ok", "accuracy": a, "accuracy_motion": a, "accuracy_detail": d}
            for v, a, d in [("full", 0.9, 0.8), ("full", 0.92, 0.7), ("full", 0.94, 0.75),
                            ("no_lste", 0.3, 0.74), ("no_lste", 0.28, 0.78), ("no_lste", 0.26, 0.72)]]
    summary = summarise(rows)
    text = interval_markdown(summary)
    assert "| variant | frames | n | overall | motion | detail |" in text  # kinds without data are left out
    assert "| no_lste | 4 | -0.640 (p=0.100) | -0.640 (p=0.100) | -0.003 (p=1.000) |" in text

    import tempfile

    from panda.experiments.collect import plot_kinds

    with tempfile.TemporaryDirectory() as out:
        path = plot_kinds(summary, out, chance=0.25)
        assert os.path.basename(path) == "accuracy_by_kind.png" and open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert plot_kinds([s | {"variant": "no_lste"} for s in summary], "/nonexistent") is None  # no baseline: no plot

    from panda.experiments.collect import kind_plot_frames

    # the baseline at 1 and 4 frames equally often: the plot shows 4, where the ablations ran
    mixed = [{"variant": "full", "frames": 1}, {"variant": "full", "frames": 4},
             {"variant": "no_lste", "frames": 4}, {"variant": "no_gstra", "frames": 4}]
    assert kind_plot_frames(mixed) == 4
    assert kind_plot_frames(mixed[:2]) == 4  # a tie goes to the larger count
    assert kind_plot_frames([{"variant": "full", "frames": 8}, {"variant": "no_lste", "frames": 4}]) == 8
    assert kind_plot_frames(mixed[2:]) is None


def test_stab_probe_trains_and_scores_each_question_type_through_the_real_decode(synthetic_root, tmp_path):
    """The ablations_v2 harness: STAB + reader on the real mp4 files; summary.json in collect's format."""
    from panda.config import to_train_config

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "ablations_v2",
                        "stab_probe.py")
    spec = importlib.util.spec_from_file_location("stab_probe", path)  # the study's own module, not part of panda
    stab_probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stab_probe)
    question_kind, run_probe = stab_probe.question_kind, stab_probe.run_probe

    cfg = to_train_config(compose([f"data.root={synthetic_root}", "data.synthetic=null", "stab.width=32",
                                   "trainer.max_steps=3", "data.batch_size=4", "data.eval_batch_size=8",
                                   "trainer.enable_progress_bar=false"]))
    summary = run_probe(cfg, str(tmp_path / "run"))
    assert summary["eval/num_questions"] == 8  # 4 held-out videos x (colour, direction)
    assert set(summary) >= {"eval/accuracy_appearance", "eval/accuracy_motion", "params/stab", "time/wall_s"}
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["train/steps"] == 3
    only = run_probe(cfg, str(tmp_path / "direction"), ["direction"])
    assert only["eval/num_questions"] == 4 and "eval/accuracy_appearance" not in only
    with pytest.raises(ValueError, match="asks no"):
        run_probe(cfg, str(tmp_path / "x"), ["order"])
    assert question_kind("<video>\nWhich way does the object go?") == "direction"
