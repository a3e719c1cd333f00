"""``evaluate.py``: generate answers for one or more benchmarks, judge them, write the results.

Per benchmark, in ``run_dir/<benchmark>/``:

- ``predictions.jsonl`` — one line per generation, keyed by ``uid``; written batch by batch, so
  an interrupted run resumes without regenerating finished questions. A video that is missing
  or unreadable gets an ``error`` line instead (retried on resume, reported, never dropped).
- ``generation.json`` — the settings the predictions were made under (:func:`generation_settings`):
  a run resumes them only under the same settings; under others they move to
  ``superseded/<date>_<time>/`` (with a warning naming what changed) and are generated again
  (:func:`keep_predictions_of`).
- ``judgements.jsonl`` — one line per judge request: verdict, score, or the failure reason.

Settings a ``train.py`` checkpoint records for its own held-out evaluation (``max_new_tokens``,
``data.eval_batch_size``, ``frames``, the frame sampling) apply where the user set nothing
(:func:`settings_in_force`); ``evaluate`` prints each setting in force and where it came from.

Then ``run_dir/results.json`` and ``run_dir/results.md`` (the paper's Tables 1 and 2 layout with
the published Video-Panda row). Under ``torchrun`` (``WORLD_SIZE`` > 1) every process generates a
slice; rank 0 merges the slices and judges.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import logging
import os
import shutil
import time
from datetime import datetime
from typing import Iterable

import torch

from panda.config import BenchmarkConfig, EvaluateConfig, to_evaluate_config
from panda.data.conversation import ChatFormat, stop_token_ids
from panda.data.budget import sampling_rule
from panda.data.datamodule import make_loader
from panda.data.datasets import FramePipeline, QADataset, find_video
from panda.data.records import QAItem
from panda.evaluation.benchmarks import (MCQ_TITLES, PUBLISHED_MCQ, PUBLISHED_QA, PUBLISHED_VCG, QA_TITLES, VCG_CRITERIA,
                                         Benchmark, MultipleChoiceBenchmark, load_benchmark)
from panda.evaluation.judge import JUDGES, build_judge
from panda.evaluation.mcq import check_letter_tokens, resolve_choices
from panda.evaluation.qa import generate_answers
from panda.loading import LoadedModel, load_model
from panda.runs import git_commit, hydra_overrides, print_summary, run_dir_of, wandb_offline

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- predictions


def read_predictions(folder: str) -> dict[str, dict]:
    """Every line of ``predictions*.jsonl`` in ``folder``, keyed by uid; an answer beats an error."""
    rows: dict[str, dict] = {}
    for path in sorted(glob.glob(os.path.join(folder, "predictions*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by an interruption: regenerate it
                    continue
                if "prediction" in row or row["uid"] not in rows:
                    rows[row["uid"]] = row
    return rows


GENERATION_FILE = "generation.json"
# what generation writes into a benchmark's folder (judgements and choices follow from the predictions)
GENERATED_FILES = ("predictions*.jsonl", "choices.jsonl", "judgements.jsonl", GENERATION_FILE)


def checkpoint_identity(path: str) -> dict:
    """Which weights: the checkpoint's path, its size and when it last changed (of a folder: all
    its files' size, the newest change), so a checkpoint overwritten in place is another one."""
    files = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, names in os.walk(path) for f in names]
    stats = [os.stat(f) for f in files]
    return {"checkpoint": os.path.abspath(path), "checkpoint_bytes": sum(st.st_size for st in stats),
            "checkpoint_modified": datetime.fromtimestamp(max(st.st_mtime for st in stats)).isoformat()}


def generation_settings(cfg: EvaluateConfig, template: ChatFormat) -> dict:
    """Everything that shapes a prediction, as ``generation.json`` keeps it: the weights, the frames
    and how they are sampled, the prompt template, the decoding. Batch size, workers and the
    attention kernel are left out: they change the speed, not what greedy decoding answers."""
    sampling = {"sampling": str(cfg.sampling), "sample_fps": cfg.sample_fps}
    if str(cfg.sampling) != "release":
        sampling["max_frames"] = cfg.max_frames
    if str(cfg.sampling) == "budget":
        sampling["max_visual_tokens"] = cfg.max_visual_tokens
    return {**checkpoint_identity(cfg.checkpoint), "frames": cfg.frames, **sampling, "template": template.name,
            "tokenization": str(template.tokenization), "greedy": True, "max_new_tokens": cfg.max_new_tokens,
            "dtype": cfg.dtype}


def keep_predictions_of(folder: str, settings: dict) -> None:
    """Make ``folder``'s saved predictions those of ``settings``: ones made under other settings
    move to ``folder/superseded/<time>/`` with a one-line warning naming what differs, so they are
    generated again; then ``generation.json`` records ``settings``. Predictions without a record
    (an older panda's, or put there by hand) are kept as made under ``settings``, with a warning."""
    os.makedirs(folder, exist_ok=True)
    record = os.path.join(folder, GENERATION_FILE)
    saved = None
    if os.path.exists(record):
        with open(record, encoding="utf-8") as f:
            saved = json.load(f)
    if saved == settings:
        return
    made = sorted({p for pattern in GENERATED_FILES for p in glob.glob(os.path.join(folder, pattern))})
    name = os.path.basename(folder)
    if saved is None and made:
        log.warning("%s: the saved predictions record no settings (an older panda's, or put there by hand): resuming "
                    "them as made under these; move them away to generate them again", name)
    elif saved is not None and any(p != record for p in made):
        aside = os.path.join(folder, "superseded", datetime.now().strftime("%Y-%m-%d_%H-%M-%S.%f"))
        os.makedirs(aside)
        for path in made:
            shutil.move(path, aside)
        changed = ", ".join(f"{k} {saved.get(k, '–')} -> {settings.get(k, '–')}"
                            for k in dict.fromkeys([*saved, *settings]) if saved.get(k) != settings.get(k))
        log.warning("%s: the saved predictions were made under other settings (%s): generating them again; "
                    "the old ones are superseded, in %s", name, changed, aside)
    with open(record, "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=2)


def generate_predictions(model, tokenizer, bench: Benchmark, folder: str, pipeline: FramePipeline,
                         template: ChatFormat,
                         batch_size: int, max_new_tokens: int, num_workers: int | None, rank: int = 0,
                         world: int = 1) -> int:
    """Generate what is missing from this rank's slice; returns how many generations ran."""
    os.makedirs(folder, exist_ok=True)
    done = {uid for uid, row in read_predictions(folder).items() if "prediction" in row}
    todo = [it for k, it in enumerate(bench.items) if k % world == rank and it.uid not in done]
    if not todo:
        return 0
    log.info("%s: %d to generate on rank %d (%d already done)", bench.cfg.name, len(todo), rank, len(done))
    dataset = QADataset([QAItem(it.uid, it.video, it.question, "") for it in todo], bench.video_dir, tokenizer,
                        template, pipeline)
    loader = make_loader(dataset, batch_size, num_workers, tokenizer.pad_token_id, patch_size=pipeline.patch_size)
    path = os.path.join(folder, f"predictions.rank{rank}.jsonl" if world > 1 else "predictions.jsonl")
    with open(path, "a", encoding="utf-8") as f:

        def write(new: dict, failed: list[dict]) -> None:
            for uid, text in new.items():
                f.write(json.dumps({"uid": uid, "prediction": text}) + "\n")
            for miss in failed:
                f.write(json.dumps({"uid": miss["id"], "error": miss["reason"], "path": miss["path"]}) + "\n")
            f.flush()

        generate_answers(model, loader, tokenizer, max_new_tokens, on_batch=write,
                         stop_ids=stop_token_ids(template, tokenizer, model.llm))
    return len(todo)


def merge_predictions(bench: Benchmark, folder: str) -> dict[str, dict]:
    """One ``predictions.jsonl`` in benchmark order from all ranks' files; the rank files go."""
    rows = read_predictions(folder)
    ordered = [rows[it.uid] for it in bench.items if it.uid in rows]
    tmp = os.path.join(folder, "predictions.jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in ordered:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, os.path.join(folder, "predictions.jsonl"))
    for path in glob.glob(os.path.join(folder, "predictions.rank*.jsonl")):
        os.remove(path)
    return rows


# ---------------------------------------------------------------------------- judging and results


def aggregate(bench: Benchmark, rows: dict[str, dict], judged: list[tuple[str, str, object]]) -> dict:
    """Metrics of one benchmark from its predictions and verdicts (docs/recipe-reference.md,
    "Evaluation"): the counts every benchmark reports, then the benchmark's own
    (``Benchmark.summarise``) from the verdicts that parsed."""
    missing = sorted(uid for uid, row in rows.items() if "prediction" not in row)
    never = [it.uid for it in bench.items if it.uid not in rows]
    failures = [(group, crit, v.reason) for group, crit, v in judged if not v.ok]
    out = {
        "num_questions": bench.num_questions,
        "judged": sum(v.ok for _, _, v in judged),
        "judge_failures": {"count": len(failures), "items": [{"id": g, "criterion": c, "reason": r} for g, c, r in failures]},
        "missing_videos": {"count": len(missing), "ids": missing},
        "not_generated": {"count": len(never), "ids": never},
    }
    out.update(bench.summarise([(group, crit, v) for group, crit, v in judged if v.ok]))
    return out


def shortfall(name: str, res: dict) -> str | None:
    """One line saying what a benchmark's numbers leave out (missing videos, judge failures,
    questions never generated), or None when every question was judged."""
    parts = []
    for key, what in (("missing_videos", "missing or unreadable video(s)"), ("judge_failures", "judge failure(s)"),
                      ("not_generated", "question(s) not generated")):
        entry = res.get(key) or {}
        if entry.get("count"):
            ids = entry.get("ids") or [item["id"] for item in entry.get("items", [])]
            shown = ", ".join(map(str, ids[:5])) + (", …" if len(ids) > 5 else "")
            parts.append(f"{entry['count']} {what} ({shown})")
    if not parts:
        return None
    judged = f"nothing judged of {res['num_questions']} questions" if not res.get("judged") else \
        f"{res['judged']} of {res['num_questions']} judged"
    return f"`{name}`: {judged}; " + "; ".join(parts)


def nothing_judged(results: dict) -> list[str]:
    """The benchmarks of a results dict without a single judged answer (``evaluate.py`` exits 1)."""
    return [name for name, res in results.get("benchmarks", {}).items() if not res.get("judged")]


def markdown_table(results: dict) -> str:
    def fmt(x, digits):
        return "–" if x is None else f"{x:.{digits}f}"

    def interval(ci, digits, scale=1.0):  # the 95% bootstrap interval after a number, when there is one
        return "" if not ci else f" [{scale * ci[0]:.{digits}f}, {scale * ci[1]:.{digits}f}]"

    lines = []
    qa = {k: v for k, v in results["benchmarks"].items() if "accuracy" in v and "decided_by_parser" not in v}
    mcq = {k: v for k, v in results["benchmarks"].items() if "decided_by_parser" in v}
    if qa:
        names = list(qa)
        header = [QA_TITLES.get(n, n) for n in names]
        lines += ["Open-ended VideoQA (accuracy % / score), the layout of the paper's Table 1; [low, high]: the 95% "
                  "bootstrap interval over questions (2000 resamples, seed 0)", "",
                  "| model | " + " | ".join(header) + " |", "|---|" + "---|" * len(names),
                  "| this run | " + " | ".join(
                      f"{fmt(qa[n]['accuracy'] and 100 * qa[n]['accuracy'], 1)}{interval(qa[n].get('accuracy_ci95'), 1, 100)} / "
                      f"{fmt(qa[n]['score'], 2)}{interval(qa[n].get('score_ci95'), 2)}" for n in names) + " |"]
        if any(n in PUBLISHED_QA for n in names):
            lines.append("| Video-Panda (published) | " + " | ".join(
                f"{PUBLISHED_QA[n][0]} / {PUBLISHED_QA[n][1]}" if n in PUBLISHED_QA else "–" for n in names) + " |")
        lines.append("")
    if mcq:
        names = list(mcq)
        lines += ["Multiple-choice video QA (accuracy %, 95% bootstrap interval), the layout of the paper's Table 11", "",
                  "| model | " + " | ".join(MCQ_TITLES.get(n, n) for n in names) + " |", "|---|" + "---|" * len(names),
                  "| this run | " + " | ".join(f"{fmt(mcq[n]['accuracy'] and 100 * mcq[n]['accuracy'], 1)}"
                                               f"{interval(mcq[n].get('accuracy_ci95'), 1, 100)}" for n in names) + " |",
                  "| Video-Panda (published) | " + " | ".join(_published_mcq(n, mcq[n]) for n in names) + " |", "",
                  "Decided by: " + "; ".join(f"`{n}` parser {mcq[n]['decided_by_parser']}, log-likelihood "
                                             f"{mcq[n]['decided_by_loglikelihood']}, none {mcq[n]['decided_by_none']}" for n in names), ""]
        for n in names:
            splits = sorted(k[len("accuracy_duration="):] for k in mcq[n] if k.startswith("accuracy_duration=")
                            and not k.endswith("_ci95"))
            if splits:
                lines += [f"`{n}` by duration: " + ", ".join(
                    f"{d} {fmt(mcq[n][f'accuracy_duration={d}'] * 100, 1)}"
                    f"{interval(mcq[n].get(f'accuracy_duration={d}_ci95'), 1, 100)}" for d in splits), ""]
    for name, res in results["benchmarks"].items():
        if "correctness" in res:
            cols = list(VCG_CRITERIA) + ["average"]
            lines += [f"Video-ChatGPT benchmark `{name}`, the layout of the paper's Table 2", "",
                      "| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols),
                      "| this run | " + " | ".join(fmt(res[c], 2) + interval(res.get(f"{c}_ci95"), 2) for c in cols) + " |",
                      "| Video-Panda (published) | " + " | ".join(f"{PUBLISHED_VCG[c]:.2f}" for c in cols) + " |", ""]
    problems = [line for name, res in results["benchmarks"].items() if (line := shortfall(name, res))]
    if problems:
        lines += ["Not in the numbers above:", ""] + [f"- {p}" for p in problems] + [""]
    judge = results["judge"]
    pin = f" @ `{judge['fingerprint']['revision']}`" if (judge.get("fingerprint") or {}).get("revision") else ""
    fp = f", fingerprint `{judge['fingerprint_id']}`" if judge.get("fingerprint_id") else ""
    lines.append(f"Judge: `{judge['model']}`{pin} (served: {', '.join(judge['served_models']) or '–'}), prompts `{judge['prompt_version']}`{fp}; "
                 f"checkpoint `{results['checkpoint']}`, {results['frames']} frames, greedy, max {results['decoding']['max_new_tokens']} new tokens.")
    return "\n".join(lines) + "\n"


def log_to_wandb(cfg, results: dict, samples: list[dict], run_dir: str) -> None:
    import wandb

    offline = wandb_offline(cfg.logger.offline, run_dir)
    run = wandb.init(project=cfg.logger.project, group=cfg.logger.group, name=cfg.name, dir=run_dir,
                     mode="offline" if offline else "online", config={"checkpoint": results["checkpoint"], "frames": results["frames"],
                                                                      "judge": results["judge"]["model"]})
    flat = {}
    for bench, res in results["benchmarks"].items():
        flat.update({k: v for k, v in scalar_metrics(res, f"{bench}/").items() if isinstance(v, (int, float))})
    run.log(flat)
    table = wandb.Table(columns=["benchmark", "id", "frames", "question", "reference", "prediction", "verdict", "score"])
    for s in samples:
        strip = s.get("strip")
        table.add_data(s["benchmark"], s["id"], wandb.Image(strip) if strip is not None else None, s["question"],
                       s["reference"], s["prediction"], s["verdict"], s["score"])
    run.log({"samples": table})
    run.finish()


def frame_strip(path: str, frames: int = 4, height: int = 64):
    """A horizontal strip of ``frames`` frames of a video, for the samples table (None if unreadable)."""
    import numpy as np
    import torch.nn.functional as F

    from panda.data.video import decode_video
    from panda.errors import VideoDecodeError

    try:
        clip = decode_video(path, frames, 1.0).frames
    except VideoDecodeError:
        return None
    x = torch.as_tensor(np.asarray(clip)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(height, int(height * x.shape[3] / x.shape[2])), mode="bilinear", align_corners=False)
    return torch.cat(list(x), dim=2).permute(1, 2, 0).clamp(0, 255).byte().numpy()


def scalar_metrics(res: dict, prefix: str = "") -> dict:
    """The scalar metrics of one benchmark's results (a count for each failure list): the names
    ``results.json``, wandb and a training run's ``summary.json`` (``eval/``) all use."""
    flat = {}
    for k, v in res.items():
        if isinstance(v, dict) and "count" in v:
            flat[prefix + k] = v["count"]
        elif v is None or isinstance(v, (int, float, str)):
            flat[prefix + k] = v
    return flat


def judge_benchmark(bench: Benchmark, folder: str, rows: dict[str, dict], judge) -> tuple[dict, list]:
    """Judge the predictions in ``rows``, write ``judgements.jsonl``; (metrics, [(id, criterion, task, verdict)])."""
    predictions = {uid: row["prediction"] for uid, row in rows.items() if "prediction" in row}
    tasks = bench.judge_tasks(predictions)
    verdicts = judge.judge_all([t for _, _, t in tasks], desc=f"judging {bench.cfg.name}")
    judged = [(g, c, t, v) for (g, c, t), v in zip(tasks, verdicts)]
    with open(os.path.join(folder, "judgements.jsonl"), "w", encoding="utf-8") as f:
        types = bench.question_types()
        for g, c, t, v in judged:  # what python -m panda.evaluation.agreement compares across judges
            f.write(json.dumps({"id": g, "criterion": c, "ok": v.ok, "pred": v.pred, "score": v.score,
                                "reason": v.reason, "cached": v.cached, "type": types.get(g),
                                "question": t.question, "reference": t.reference, "prediction": t.prediction}) + "\n")
    res = aggregate(bench, rows, [(g, c, v) for g, c, _, v in judged])
    res["judge"] = judge.model
    return res, judged


def run_benchmark(model, tokenizer, bench: Benchmark, folder: str, pipeline: FramePipeline, template: ChatFormat,
                  judge, batch_size: int, max_new_tokens: int, num_workers: int | None) -> dict:
    """Generate what is missing and judge, in one process: the held-out split of a training run
    goes through here, the same path as ``evaluate.py``."""
    generated = generate_predictions(model, tokenizer, bench, folder, pipeline, template, batch_size, max_new_tokens, num_workers)
    res, _ = judge_benchmark(bench, folder, merge_predictions(bench, folder), judge)
    res["generated_now"] = generated
    return res


def benchmark_config(name: str, bcfg: BenchmarkConfig, run_cfg, checkpoint: str) -> BenchmarkConfig:
    """``bcfg`` named ``name``; a ``from_checkpoint`` benchmark without a root reads the held-out
    split stored in the training run's config."""
    bcfg = dataclasses.replace(bcfg, name=name)
    if bcfg.from_checkpoint and not bcfg.root:
        if run_cfg is None or not run_cfg.data.eval_qa:
            raise ValueError(f"benchmark {name} reads the held-out split of a train.py checkpoint; "
                             f"{checkpoint} has none: set benchmark.{name}.root and qa_dir")
        bcfg = dataclasses.replace(bcfg, root=run_cfg.data.root, qa_dir=bcfg.qa_dir or run_cfg.data.eval_qa)
    return bcfg


# evaluate.py's settings that a train.py checkpoint holds for its own held-out evaluation: where in its config
FROM_TRAINING_RUN = {"frames": "frames", "max_new_tokens": "max_new_tokens", "batch_size": "data.eval_batch_size",
                     "sample_fps": "data.sample_fps", "sampling": "data.sampling", "max_frames": "data.max_frames",
                     "max_visual_tokens": "data.max_visual_tokens"}


def command_line_keys() -> set[str]:
    """The top-level keys this process's Hydra command line sets (empty outside Hydra)."""
    return {o.lstrip("+~").split("=", 1)[0] for o in hydra_overrides()}


def settings_in_force(cfg: EvaluateConfig, loaded: LoadedModel, command_line: Iterable[str]) -> tuple[EvaluateConfig, dict]:
    """``cfg`` with each setting of :data:`FROM_TRAINING_RUN` resolved, and {setting: where it came from}:

    - ``command line``: named in ``command_line``, whatever its value;
    - ``config``: a value other than the default (a config file, or a caller outside Hydra);
    - ``checkpoint: <key>``: a ``train.py`` checkpoint's own evaluation setting (its held-out
      evaluation ran with it);
    - ``checkpoint``: the frame count a folder records (a release folder keeps the other defaults);
    - ``default``: :class:`EvaluateConfig`'s.
    """
    command_line = set(command_line)
    defaults = {f.name: f.default for f in dataclasses.fields(EvaluateConfig)}
    values, sources = {}, {}
    for name, key in FROM_TRAINING_RUN.items():
        value = getattr(cfg, name)
        if name in command_line and value is not None:
            source = "command line"
        elif value != defaults[name]:
            source = "config"
        elif loaded.run_config is not None:
            value, source = functools.reduce(getattr, key.split("."), loaded.run_config), f"checkpoint: {key}"
        elif name == "frames":
            value, source = loaded.frames, "checkpoint"
        else:
            source = "default"
        values[name], sources[name] = value, source
    return dataclasses.replace(cfg, **values), sources


def evaluate(cfg) -> dict:
    """``evaluate.py``: every configured benchmark of one checkpoint -> ``results.json`` and ``results.md``."""
    cfg: EvaluateConfig = to_evaluate_config(cfg)
    _check_judges_registered(cfg)
    start = time.time()
    rank, world = _join_ranks()
    device = _device_of(cfg)
    if not cfg.benchmark:
        raise ValueError("no benchmark selected: add benchmark=[synthetic] (or msvd_qa, msrvtt_qa, tgif_qa, activitynet_qa, vcgbench)")
    loaded = load_model(cfg.checkpoint, cfg.dtype, cfg.attn_implementation)
    model = loaded.model.to(device).eval()
    cfg, sources = settings_in_force(cfg, loaded, command_line_keys())
    if rank == 0:
        _print_settings(cfg, sources)
    pipeline = _frame_pipeline(cfg, model.stab_cfg)
    session = _Session(cfg, loaded.run_config, model, loaded.tokenizer, loaded.prompt_template, pipeline,
                       _shared_run_dir(cfg, world), rank, world)
    results = _results_header(cfg, session.template, sources)
    settings = generation_settings(cfg, session.template)
    samples = []
    for name, bcfg in cfg.benchmark.items():
        outcome = _evaluate_benchmark(session, name, bcfg, settings)
        if outcome is not None:  # rank 0
            results["benchmarks"][name], benchmark_samples = outcome
            samples += benchmark_samples
    _leave_ranks(world)
    if rank != 0:
        return {}
    results["judge"] = _judge_summary(cfg, session.judges)
    results["time/eval_s"] = round(time.time() - start, 2)
    _write_results(session.run_dir, results)
    if cfg.logger.kind == "wandb":
        _log_samples_to_wandb(cfg, results, samples, session.run_dir)
    _print_results(results)
    return results


@dataclasses.dataclass
class _Session:
    """What every benchmark of one :func:`evaluate` shares."""

    cfg: EvaluateConfig  # with the settings in force
    run_config: object  # the train.py run's config a checkpoint keeps (None for a release folder)
    model: torch.nn.Module  # on the device, in eval mode
    tokenizer: object
    template: ChatFormat
    pipeline: FramePipeline
    run_dir: str
    rank: int
    world: int  # processes: each generates a slice of every benchmark, rank 0 merges and judges
    judges: dict = dataclasses.field(default_factory=dict)  # judge kind -> judge, built when first needed (rank 0)


def _check_judges_registered(cfg: EvaluateConfig) -> None:
    """Every judge this run names is registered, before any answer is generated."""
    for kind in {cfg.judge.kind, *(b.judge for b in cfg.benchmark.values() if b.judge)}:
        JUDGES[kind]


def _join_ranks() -> tuple[int, int]:
    """(rank, world) of this process: torchrun's ``RANK`` and ``WORLD_SIZE`` (0, 1 without); with
    several processes, the process group is joined (NCCL with CUDA, else gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return rank, world


def _device_of(cfg: EvaluateConfig) -> str:
    """``cfg.device``; ``auto``: this process's GPU (``LOCAL_RANK``) when CUDA is there, else the CPU."""
    device = cfg.device
    if device == "auto":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    return device


def _print_settings(cfg: EvaluateConfig, sources: dict) -> None:
    """The ``evaluation settings`` block: each setting in force and where it came from."""
    width = max(len(str(getattr(cfg, name))) for name in sources)
    print_summary({name: f"{str(getattr(cfg, name)):<{width}}  ({source})" for name, source in sources.items()},
                  title="evaluation settings")


def _frame_pipeline(cfg: EvaluateConfig, stab) -> FramePipeline:
    """How a benchmark video becomes the model's frames: ``cfg``'s frames and sampling, ``stab``'s geometry."""
    frames = cfg.frames
    return FramePipeline(frames, stab.resolution, stab.patch_size, stab.ratio, cfg.sample_fps,
                         sampling=sampling_rule(cfg, stab, frames))


def _shared_run_dir(cfg: EvaluateConfig, world: int) -> str:
    """The run folder, made: rank 0's on every rank."""
    run_dir = run_dir_of(cfg)
    if world > 1:  # ranks may have started a second apart: all write where rank 0 writes
        shared = [run_dir]
        torch.distributed.broadcast_object_list(shared, src=0)
        run_dir = shared[0]
    os.makedirs(run_dir, exist_ok=True)
    return run_dir


def _results_header(cfg: EvaluateConfig, template: ChatFormat, sources: dict) -> dict:
    """``results.json`` before any benchmark: the checkpoint, frames, decoding, each setting in
    force and where it came from, the code's commit; ``benchmarks`` still empty."""
    return {"checkpoint": os.path.abspath(cfg.checkpoint), "frames": cfg.frames,
            "decoding": {"greedy": True, "max_new_tokens": cfg.max_new_tokens, "template": template.name,
                         "tokenization": template.tokenization},
            "settings": {name: {"value": getattr(cfg, name), "from": source}
                         for name, source in sources.items()},
            "git_commit": git_commit(), "benchmarks": {}}


def _evaluate_benchmark(s: _Session, name: str, bcfg: BenchmarkConfig, settings: dict) -> tuple[dict, list[dict]] | None:
    """One benchmark: every rank generates its slice of what is missing, then rank 0 judges it all.
    Returns (its metrics, its samples for the wandb table) on rank 0, None on the others."""
    bench = load_benchmark(benchmark_config(name, bcfg, s.run_config, s.cfg.checkpoint))
    if isinstance(bench, MultipleChoiceBenchmark):  # before generating: the fallback can tell the letters apart
        check_letter_tokens(bench, s.tokenizer)
    folder = os.path.join(s.run_dir, name)
    generated = _generate_slice(s, bench, folder, settings)
    if s.rank != 0:
        return None
    res, judged = _merge_and_judge(s, bench, folder, bcfg.judge or s.cfg.judge.kind)
    res["generated_now"] = generated
    log.info("%s: %s", name, scalar_metrics(res))
    return res, _samples_of(name, bench, judged, s.cfg.samples)


def _generate_slice(s: _Session, bench: Benchmark, folder: str, settings: dict) -> int:
    """This rank's slice of what ``folder`` lacks, generated under ``settings`` (rank 0 first sets
    aside predictions made under others); returns how many generations ran."""
    if s.rank == 0:
        keep_predictions_of(folder, settings)
    if s.world > 1:  # no rank resumes predictions before rank 0 has set aside those of other settings
        torch.distributed.barrier()
    generated = generate_predictions(s.model, s.tokenizer, bench, folder, s.pipeline, s.template, s.cfg.batch_size,
                                     s.cfg.max_new_tokens, s.cfg.num_workers, s.rank, s.world)
    if s.world > 1:
        torch.distributed.barrier()
    return generated


def _merge_and_judge(s: _Session, bench: Benchmark, folder: str, kind: str) -> tuple[dict, list]:
    """Rank 0: the ranks' predictions merged, the option each multiple-choice answer chose, then the
    judge of ``kind`` (built on first use) over them (:func:`judge_benchmark`)."""
    if kind not in s.judges:
        s.judges[kind] = build_judge(dataclasses.replace(s.cfg.judge, kind=kind))
    rows = merge_predictions(bench, folder)
    if isinstance(bench, MultipleChoiceBenchmark):  # the option each answer chose (the model breaks ties)
        resolve_choices(bench, folder, rows, s.model, s.tokenizer, s.template, s.pipeline)
    return judge_benchmark(bench, folder, rows, s.judges[kind])


def _samples_of(name: str, bench: Benchmark, judged: list, count: int) -> list[dict]:
    """The first ``count`` judged answers of a benchmark, as rows of the samples table (the video to
    draw a frame strip of, if the judged id names one)."""
    samples = []
    for g, _, t, v in judged[:count]:
        item = next((it for it in bench.items if it.uid == g or it.uid.startswith(g + "/")), None)
        samples.append({"benchmark": name, "id": g, "question": t.question, "reference": t.reference,
                        "prediction": t.prediction, "verdict": v.pred if v.ok else f"failed: {v.reason}", "score": v.score,
                        "video": item.video if item else None, "video_dir": bench.video_dir})
    return samples


def _leave_ranks(world: int) -> None:
    """With several processes: wait for all, then leave the process group."""
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _judge_summary(cfg: EvaluateConfig, judges: dict) -> dict:
    """``results.json``'s ``judge``: the main judge (``cfg.judge.kind``, else the first used) and
    what all of them served, called and found in their caches."""
    main_judge = judges.get(cfg.judge.kind) or next(iter(judges.values()))
    return {
        "kind": str(cfg.judge.kind), "model": main_judge.model, "base_url": cfg.judge.base_url,
        "served_models": sorted(set().union(*(j.served_models for j in judges.values()))),
        "prompt_version": main_judge.prompt_version,
        # model, revision, prompt version, decoding settings, schema: what the verdict cache is keyed by
        "fingerprint": getattr(main_judge, "fingerprint", None),
        "fingerprint_id": getattr(main_judge, "fingerprint_id", None),
        "api_calls": sum(j.api_calls for j in judges.values()),
        "cache_hits": sum(j.cache.hits for j in judges.values()),
    }


def _write_results(run_dir: str, results: dict) -> None:
    """``run_dir/results.json`` and ``run_dir/results.md`` (:func:`markdown_table`)."""
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(run_dir, "results.md"), "w") as f:
        f.write(markdown_table(results))


def _log_samples_to_wandb(cfg, results: dict, samples: list[dict], run_dir: str) -> None:
    """Each sample's frame strip (None when its video is not found), then :func:`log_to_wandb`."""
    for s in samples:
        path = find_video(s["video_dir"], s["video"]) if s["video"] else None
        s["strip"] = frame_strip(path) if path else None
    log_to_wandb(cfg, results, samples, run_dir)


def _print_results(results: dict) -> None:
    """The ``panda evaluation`` summary: every benchmark's scalar metrics and the judge."""
    print_summary({k: v for b, r in results["benchmarks"].items() for k, v in scalar_metrics(r, f"{b}/").items()}
                  | {"judge": results["judge"]["model"], "judge/api_calls": results["judge"]["api_calls"]},
                  title="panda evaluation")


def _published_mcq(name: str, result: dict) -> str:
    """The paper's Table 11 cell for benchmark ``name``; where it was measured on one duration split
    (Video-MME: medium), that split's accuracy of this run beside it, the number to compare."""
    if name not in PUBLISHED_MCQ:
        return "–"
    value, split = PUBLISHED_MCQ[name]
    if split is None:
        return f"{value}"
    ours = result.get(f"accuracy_duration={split}")
    return f"{value} ({split} videos; this run: {'–' if ours is None else f'{100 * ours:.1f}'})"
