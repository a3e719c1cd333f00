"""The model card (``README.md``) of an exported folder, written by ``panda export``.

:func:`write_model_card` renders what is known about a checkpoint into a Hugging Face model card:
the Hub's YAML front matter (license, library, pipeline tag, base model, tags), the base LLM and
STAB as the checkpoint builds them, the training stage and data from the run's config (and the
earlier stages its ``init.path`` leads to), the results recorded for this checkpoint, how to load
the folder, and the panda version and commit it was exported with.

Where the facts come from:

- the model itself (``LoadedModel.model``): the LLM's class and sizes, STAB's config, parameters;
- the run's config stored in the checkpoint (``LoadedModel.run_config``): stage, data, schedule,
  initialisation, LoRA, distillation; an earlier stage's config from its own checkpoint, found from
  ``init.path`` (a stage's ``RUN/final`` export sits beside ``RUN/checkpoints/last.ckpt``);
- the checkpoint's run folder (the ``.ckpt`` lives in ``RUN/checkpoints/``): ``summary.json`` for the
  held-out accuracy at the end of training, when it names this checkpoint at this step, with 95%
  bootstrap intervals recomputed from ``heldout/judgements.jsonl`` the way ``evaluate.py`` computes
  them; and every ``results.json`` that ``evaluate.py`` wrote for this checkpoint under the run
  folder or under ``outputs/evaluate/`` (evaluate.py's default), newer than the checkpoint.

Nothing here writes anything but ``README.md``; a fact that cannot be found is written as unknown or
"none recorded", never guessed. The card's fields: docs/evaluation.md, "The model card".
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.metadata
import json
import os
import re
from datetime import datetime, timezone

import panda
from panda.config import TrainConfig, distill_active
from panda.loading import LoadedModel, read_checkpoint_meta, run_config_of
from panda.models.checkpoints import PANDA_META_FILE, PANDA_VISION_FILE
from panda.runs import git_commit, has_uncommitted_changes

FORMATS = ("release", "hf")
DEFAULT_LICENSE = "other"  # when --license is not given and the base LLM's folder names none
PIPELINE_TAG = "video-text-to-text"
BASE_TAGS = ["video", "video-language", "stab", "panda"]
MAX_EARLIER_STAGES = 8  # how far back the init.path chain is followed
MAX_RESULTS = 10  # evaluate.py results.json files listed at most (newest first)
CARD = "README.md"

# STAB's keys (panda/models/stab.py, STABConfig), in the card's words
STAB_KEYS = {
    "width": "width of every STAB token (the projector maps it to the LLM's width)",
    "heads": "attention heads of LSD, FSRA and GSTRA",
    "resolution": "square canvas side in pixels",
    "patch_size": "patch side in pixels",
    "ratio": "STAB resolution / teacher resolution",
    "lsd_window": "LSD: one token per window of this many patches a side",
    "chunk_size": "frames per chunk (one LSTE volume and one GSTRA context token each)",
    "mixer_ratio": "temporal mixer hidden width = width / mixer_ratio",
    "dropout": "GSTRA MLP and fusion dropout (training only)",
    "use_lste": "LSTE: local spatio-temporal encoding on each chunk",
    "use_gstra": "GSTRA: one video context token per chunk",
    "use_fsra": "FSRA: one frame context token per frame",
    "row_tokens": "a learned split token after each row of a frame's tokens",
    "lsd": "spatial reducer (attention = LSD, as released)",
    "lsd_before_lste": "spatial reducer before LSTE/GSTRA",
}


def write_model_card(loaded: LoadedModel, checkpoint_path: str | None, out_dir: str, fmt: str,
                     license: str | None = None) -> str:
    """Write ``out_dir/README.md`` for the folder just exported from ``checkpoint_path`` (a
    ``train.py`` ``.ckpt``; None when the model came from elsewhere) in ``fmt`` (``release`` or
    ``hf``); ``license`` is the Hub license id (None: the base LLM folder's, else ``other``).
    Returns the card's path."""
    text = render_model_card(loaded, checkpoint_path, out_dir, fmt, license)
    path = os.path.join(out_dir, CARD)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def render_model_card(loaded: LoadedModel, checkpoint_path: str | None, out_dir: str, fmt: str,
                      license: str | None = None) -> str:
    """The card's text (front matter and body); see :func:`write_model_card`."""
    if fmt not in FORMATS:
        raise ValueError(f"model card format {fmt!r}: use one of {', '.join(FORMATS)}")
    facts = _Facts.gather(loaded, checkpoint_path, out_dir, fmt, license)
    return front_matter(facts.metadata()) + "\n".join(facts.body()) + "\n"


def front_matter(metadata: dict) -> str:
    import yaml

    return "---\n" + yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True, width=1000) + "---\n\n"


# ---------------------------------------------------------------------------- provenance


def panda_version() -> str:
    """The installed distribution's version, else the package's ``__version__``."""
    try:
        return importlib.metadata.version("panda")
    except importlib.metadata.PackageNotFoundError:
        return panda.__version__


def export_commit() -> tuple[str, bool]:
    """(commit, uncommitted changes to tracked files) of the git checkout panda runs from
    (:func:`panda.runs.git_commit`); ("unknown", False) outside one."""
    commit = git_commit()
    return (commit, has_uncommitted_changes()) if commit else ("unknown", False)


# ---------------------------------------------------------------------------- base model, license


def hub_id_of(path: str | None) -> str | None:
    """A name for ``base_model``: the Hub id of a Hugging Face cache snapshot
    (``.../models--ORG--NAME/snapshots/REV``), an ``ORG/NAME`` that is not a local path, else the
    folder's name."""
    if not path:
        return None
    match = re.search(r"models--([^/\\]+?)--([^/\\]+)", path)
    if match:
        return f"{match.group(1)}/{match.group(2)}"
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not os.path.exists(path):
        return path
    return os.path.basename(os.path.normpath(path)) or None


def folder_license(folder: str | None) -> dict:
    """``license`` (and ``license_name``, ``license_link``) from the front matter of a local model
    folder's ``README.md``; empty when there is none."""
    if not folder or not os.path.isfile(os.path.join(folder, CARD)):
        return {}
    try:
        meta = read_front_matter(open(os.path.join(folder, CARD), encoding="utf-8").read())
    except (OSError, ValueError):
        return {}
    return {k: meta[k] for k in ("license", "license_name", "license_link") if isinstance(meta.get(k), str)}


def read_front_matter(text: str) -> dict:
    """The YAML front matter of a Markdown text (empty without one)."""
    import yaml

    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    try:
        meta = yaml.safe_load(text[3:end])
    except yaml.YAMLError as exc:
        raise ValueError(f"invalid YAML front matter: {exc}") from exc
    return meta if isinstance(meta, dict) else {}


# ---------------------------------------------------------------------------- run folder


def run_dir_of_checkpoint(checkpoint_path: str | None) -> str | None:
    """``RUN`` of ``RUN/checkpoints/X.ckpt`` (a file or a sharded checkpoint's folder), else None."""
    if not checkpoint_path:
        return None
    ckpt = os.path.abspath(checkpoint_path.rstrip("/"))
    folder = os.path.dirname(ckpt)
    return os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else None


def _same_path(a: str | None, b: str | None) -> bool:
    return bool(a and b) and os.path.realpath(a.rstrip("/")) == os.path.realpath(b.rstrip("/"))


def _mtime(path: str) -> float:
    """A checkpoint's time: the file's, or a sharded checkpoint's ``meta.pt``."""
    meta = os.path.join(path, "meta.pt")
    return os.path.getmtime(meta if os.path.isdir(path) and os.path.exists(meta) else path)


def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def heldout_result(run_dir: str | None, checkpoint_path: str, step: int | None) -> tuple[dict | None, str]:
    """(the held-out metrics of ``summary.json`` with intervals, or None; what was found). Only a
    summary that names this checkpoint at this step counts."""
    if not run_dir:
        return None, "the checkpoint is not in a run folder (RUN/checkpoints/)"
    summary = _read_json(os.path.join(run_dir, "summary.json"))
    if summary is None:
        return None, "the run folder has no summary.json"
    if not _same_path(summary.get("checkpoint"), checkpoint_path) or (step is not None and summary.get("train/steps") != step):
        return None, "the run's summary.json belongs to another checkpoint or step"
    if "eval/skipped" in summary:
        return None, f"the run skipped it ({summary['eval/skipped']})"
    metrics = {k[len("eval/"):]: v for k, v in summary.items() if k.startswith("eval/")}
    if metrics.get("accuracy") is None:
        return None, "summary.json records no held-out accuracy"
    metrics.update(heldout_intervals(os.path.join(run_dir, "heldout", "judgements.jsonl"), metrics))
    return metrics, ""


def heldout_intervals(path: str, metrics: dict) -> dict:
    """95% bootstrap intervals of the held-out accuracy and score (overall and per question type)
    from the verdicts in ``judgements.jsonl``, as ``evaluate.py`` computes them; empty when the file
    is missing or its verdicts do not give the summary's accuracy."""
    from panda.evaluation.benchmarks import bootstrap_ci

    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return {}
    ok = [r for r in rows if r.get("ok")]
    if not ok or abs(sum(r.get("pred") == "yes" for r in ok) / len(ok) - metrics["accuracy"]) > 1e-9:
        return {}
    out = {}
    groups = {"": ok} | {f"_{t}": [r for r in ok if r.get("type") == t] for t in sorted({r.get("type") for r in ok} - {None})}
    for suffix, group in groups.items():
        out[f"accuracy_ci95{suffix}"] = bootstrap_ci(float(r.get("pred") == "yes") for r in group)
        out[f"score_ci95{suffix}"] = bootstrap_ci(float(r.get("score") or 0) for r in group)
    return out


def evaluate_results(run_dir: str | None, checkpoint_path: str, runs_root: str | None) -> list[tuple[str, dict]]:
    """[(path, results)] of every ``results.json`` ``evaluate.py`` wrote for this checkpoint after
    it was last written, newest first: under the run folder, and under ``outputs/evaluate/`` of the
    working directory and of the run's ``runs_root``."""
    roots = [os.path.join(run_dir, "**", "results.json")] if run_dir else []
    for base in {os.path.abspath("outputs"), os.path.abspath(runs_root or "outputs")}:
        roots.append(os.path.join(base, "evaluate", "*", "results.json"))
    since = _mtime(checkpoint_path)
    found = {}
    for pattern in roots:
        for path in glob.glob(pattern, recursive=True):
            if os.path.getmtime(path) < since:
                continue  # written before this checkpoint: another checkpoint's results
            results = _read_json(path)
            if results and _same_path(results.get("checkpoint"), checkpoint_path) and results.get("benchmarks"):
                found[os.path.realpath(path)] = results
    return sorted(found.items(), key=lambda kv: os.path.getmtime(kv[0]), reverse=True)[:MAX_RESULTS]


def earlier_stages(cfg: TrainConfig) -> list[tuple[str, TrainConfig, dict]]:
    """[(checkpoint, its run config, its meta)] of the stages before ``cfg``, earliest first: where
    ``init.path`` is a ``.ckpt`` (``init.kind=checkpoint``) or a stage's ``RUN/final`` export beside
    ``RUN/checkpoints/last.ckpt``, that checkpoint's config, and so on back."""
    chain, seen = [], set()
    while cfg is not None and len(chain) < MAX_EARLIER_STAGES:
        path = cfg.init.path
        if not path or str(cfg.init.kind) not in ("checkpoint", "release"):
            break
        if str(cfg.init.kind) == "release":
            path = os.path.join(os.path.dirname(os.path.abspath(path.rstrip("/"))), "checkpoints", "last.ckpt")
        if not os.path.exists(path) or os.path.realpath(path) in seen:
            break
        seen.add(os.path.realpath(path))
        try:
            meta = read_checkpoint_meta(path)
            cfg = run_config_of(meta, path)[0]
        except Exception:  # not a train.py checkpoint after all: the chain ends at what init.path names
            break
        chain.append((path, cfg, {k: meta.get(k) for k in ("global_step", "epoch")}))
    return list(reversed(chain))


# ---------------------------------------------------------------------------- rendering


def _fmt(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10000 else str(value)
    return "–" if value is None else str(value)


def _interval(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if isinstance(ci, (list, tuple)) and len(ci) == 2 else "–"


_COUNTS = ("num_questions", "judged", "generated_now", "judge_failures", "missing_videos", "not_generated")


def metrics_table(res: dict) -> list[str]:
    """A benchmark's numeric metrics, each with its 95% interval where the results have one
    (``accuracy_ci95``, ``accuracy_ci95_motion``, ``accuracy_duration=short_ci95`` ...)."""
    lines = ["| metric | value | 95% interval |", "|---|---|---|"]
    for key, value in res.items():
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or key in _COUNTS
                or "_ci95" in key or key.startswith(("judged_", "decided_by_"))):
            continue
        candidates = [f"{key}_ci95"] + [f"{key[:i]}_ci95{key[i:]}" for i in range(len(key)) if key[i] == "_"]
        ci = next((res[c] for c in candidates if res.get(c) is not None), None)
        lines.append(f"| {key} | {_fmt(value)} | {_interval(ci)} |")
    return lines


def _counted(res: dict) -> str:
    def count(key):
        v = res.get(key)
        return v.get("count", 0) if isinstance(v, dict) else (v or 0)

    text = f"{_fmt(res.get('judged'))} of {_fmt(res.get('num_questions'))} questions judged"
    left = [f"{count(k)} {what}" for k, what in (("missing_videos", "missing or unreadable videos"),
                                                  ("judge_failures", "judge failures"),
                                                  ("not_generated", "not generated")) if count(k)]
    return text + (f" ({'; '.join(left)})" if left else "")


def _date(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _data_source(cfg: TrainConfig) -> str:
    d = cfg.data
    if d.sources:
        parts = []
        for s in d.sources:
            own = [f"weight {s.weight}" if s.weight is not None else "", f"at most {s.cap} per epoch" if s.cap else "",
                   *(f"{key} {getattr(s, key)}" for key in ("frames", "sampling", "sample_fps", "max_frames",
                                                           "max_visual_tokens") if getattr(s, key) is not None)]
            parts.append(f"`{s.name}` ({s.path}" + "".join(f", {o}" for o in own if o) + ")")
        source = "a mixture of " + ", ".join(parts)
    elif d.shards:
        parts = [f"`{s.name}` ({s.path}" + (f", weight {s.weight}" if s.weight is not None else "") + ")" for s in d.shards]
        source = "prepared shards: " + ", ".join(parts)
    elif d.synthetic is not None:
        source = (f"the generated synthetic dataset (version {d.synthetic.version}, {d.synthetic.train_videos} training "
                  f"videos, kinds {', '.join(d.synthetic.kinds)}) under `{d.root}`")
    else:
        source = (f"records {', '.join(f'`{r}`' for r in d.train_records)} under `{d.root}` "
                  f"(videos under `{d.video_root}`)")
    extra = []
    if d.fraction < 1:
        extra.append(f"a seeded {d.fraction:g} fraction of the records (seed {d.fraction_seed})")
    if d.samples_per_epoch:
        extra.append(f"{d.samples_per_epoch} samples per epoch")
    return f"`{d.name}`: {source}" + (f"; {', '.join(extra)}" if extra else "")


def _what_trained(cfg: TrainConfig) -> str:
    s = cfg.stage
    parts = {"STAB": s.train_stab, "projector": s.train_projector, "LLM": s.train_llm}
    trained = [name for name, on in parts.items() if on]
    frozen = [name for name, on in parts.items() if not on]
    text = "trained: " + (", ".join(trained) or "nothing")
    if s.train_llm and str(cfg.llm.adapter) != "none":
        text += f" (the LLM through {cfg.llm.adapter} adapters, rank {cfg.llm.lora.rank}, alpha {cfg.llm.lora.alpha:g})"
    return text + (f"; frozen: {', '.join(frozen)}" if frozen else "")


def _start(cfg: TrainConfig) -> str:
    kind = str(cfg.init.kind)
    if kind == "none":
        return f"the LLM from `{cfg.llm.pretrained}`, the rest random" if cfg.llm.pretrained else "random initialisation"
    return f"init.kind={kind}, `{cfg.init.path}`"


def _global_batch(cfg: TrainConfig, accumulation: int | None) -> str:
    t = cfg.trainer
    if t.global_batch_size:
        return str(t.global_batch_size)
    devices = t.devices if isinstance(t.devices, int) else None
    acc = accumulation or t.accumulate_grad_batches
    if devices is None:
        return f"{cfg.data.batch_size} per device × {t.devices} devices × {t.num_nodes} nodes × {acc} accumulation"
    return str(cfg.data.batch_size * devices * t.num_nodes * acc)


def _steps(meta: dict, cfg: TrainConfig) -> str:
    limit = f"max_steps {cfg.trainer.max_steps}" if cfg.trainer.max_steps > 0 else f"max_epochs {cfg.trainer.max_epochs}"
    step, epoch = meta.get("global_step"), meta.get("epoch")
    done = f"{step} optimiser steps" if step is not None else "steps unknown"
    return f"{done}" + (f" (epoch {epoch})" if epoch is not None else "") + f"; configured {limit}"


def _stage_rows(cfg: TrainConfig, meta: dict, accumulation: int | None) -> list[str]:
    s, t = cfg.stage, cfg.trainer
    vision = f", STAB + projector {s.vision_lr:g}" if s.vision_lr is not None else ""
    rows = [
        ("stage", f"`{s.name}`; {_what_trained(cfg)}"),
        ("started from", _start(cfg)),
        ("data", _data_source(cfg)),
        ("steps", _steps(meta, cfg)),
        ("batch", f"global {_global_batch(cfg, accumulation)} samples per optimiser step (micro-batch {cfg.data.batch_size})"),
        ("learning rate", f"LLM {s.lr:g}{vision}; {s.schedule} schedule, warmup ratio {s.warmup_ratio:g}, "
                          f"min ratio {s.min_lr_ratio:g}, weight decay {s.weight_decay:g}"),
        ("precision", f"{t.precision} (strategy {t.strategy}, {t.devices} device(s) × {t.num_nodes} node(s))"),
        ("frames", f"{cfg.frames} per video, sampling `{cfg.data.sampling}`"),
        ("distillation", (f"teacher `{cfg.teacher.kind}`" + (f" (`{cfg.teacher.path}`)" if cfg.teacher.path else "")
                          + f", {cfg.distill.loss} loss, weight {cfg.distill.weight:g}") if distill_active(cfg) else "none"),
        ("seed", str(cfg.seed)),
    ]
    return ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]


def source_comments(cls: type) -> dict[str, str]:
    """field -> the comment on its line in ``cls``'s source, else the comment lines directly above
    it: the help of a field :data:`STAB_KEYS` does not describe (one added since)."""
    import inspect
    import io
    import textwrap
    import tokenize

    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    trailing, own = {}, {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row, text = tok.start[0], tok.string.lstrip("#").strip()
            (trailing if lines[row - 1][:tok.start[1]].strip() else own)[row] = text
    out = {}
    for row, line in enumerate(lines, 1):
        match = re.match(r"\s+(\w+)\s*:", line)
        if not match:
            continue
        above, r = [], row - 1
        while r in own:
            above.insert(0, own[r])
            r -= 1
        text = trailing.get(row) or " ".join(above)
        if text:
            out[match.group(1)] = text
    return out


def _stab_lines(stab) -> list[str]:
    lines = ["| key | value | what |", "|---|---|---|"]
    comments = None
    for f in dataclasses.fields(stab):
        what = STAB_KEYS.get(f.name)
        if what is None:
            comments = source_comments(type(stab)) if comments is None else comments
            what = comments.get(f.name, "")
        lines.append(f"| `stab.{f.name}` | {_fmt(getattr(stab, f.name))} | {what.replace('|', '/')} |")
    return lines


def _tokens_per_frame(stab) -> str:
    side = stab.resolution // stab.patch_size
    rows, cols = stab.spatial_grid(side, side)
    parts = (["1 context token"] if stab.has_context_token else []) + \
        [f"{rows} rows × ({cols} tokens" + (" + 1 row token)" if stab.row_tokens else ")")]
    return (f"{stab.max_tokens_per_frame()} for a square frame ({' + '.join(parts)}); frames of other aspect "
            "ratios get fewer rows or columns")


def _compression(stab) -> str:
    return f"`stab.merge_keep={stab.merge_keep}`" if stab.merge_keep is not None else \
        f"`stab.temporal_pool={stab.temporal_pool}`"


@dataclasses.dataclass
class _Facts:
    loaded: LoadedModel
    checkpoint: str | None
    out_dir: str
    fmt: str
    license: str
    license_extra: dict
    license_note: str
    base_model: str | None
    base_source: str | None
    meta: dict  # the checkpoint's global_step and epoch
    earlier: list
    run_dir: str | None
    heldout: dict | None
    heldout_note: str
    results: list
    commit: str
    dirty: bool
    trained_commit: str | None

    @classmethod
    def gather(cls, loaded: LoadedModel, checkpoint: str | None, out_dir: str, fmt: str, license: str | None) -> "_Facts":
        cfg = loaded.run_config
        meta, earlier = {}, []
        if checkpoint and cfg is not None:
            try:
                full = read_checkpoint_meta(checkpoint)
                meta = {k: full.get(k) for k in ("global_step", "epoch")}
            except Exception:  # a checkpoint that loaded but whose step cannot be read: left unknown
                meta = {}
            earlier = earlier_stages(cfg)
        first = earlier[0][1] if earlier else cfg
        base_source = None
        if first is not None:
            base_source = first.llm.pretrained or (first.init.path if str(first.init.kind) in ("eve", "release") else None)
        base_model = hub_id_of(base_source)
        extra, note = {}, ""
        if license is None:
            extra = folder_license(base_source) if base_source and os.path.isdir(base_source) else {}
            license = extra.pop("license", None)
            note = "taken from the base LLM folder's README.md" if license else \
                "none was chosen at export; `panda export --license ID` sets one"
        run_dir = run_dir_of_checkpoint(checkpoint) if cfg is not None else None
        heldout, heldout_note = (heldout_result(run_dir, checkpoint, meta.get("global_step")) if cfg is not None
                                 else (None, "the model was not loaded from a train.py checkpoint"))
        results = evaluate_results(run_dir, checkpoint, cfg.runs_root if cfg else None) if checkpoint else []
        summary = _read_json(os.path.join(run_dir, "summary.json")) if run_dir else None
        trained = summary.get("git_commit") if summary and _same_path(summary.get("checkpoint"), checkpoint) else None
        commit, dirty = export_commit()
        return cls(loaded, checkpoint, out_dir, fmt, license or DEFAULT_LICENSE, extra, note, base_model, base_source,
                   meta, earlier, run_dir, heldout, heldout_note, results, commit, dirty, trained)

    # ------------------------------------------------------------------ derived facts

    @property
    def llm(self):
        return self.loaded.model.llm

    @property
    def text_config(self):
        config = self.llm.config
        return config.get_text_config() if hasattr(config, "get_text_config") else config

    @property
    def adapter(self) -> str:
        """none | merged | unmerged: the run's LoRA adapters and what the export did with them."""
        from panda.models.adapters import has_adapter

        if has_adapter(self.llm):
            return "unmerged"
        cfg = self.loaded.run_config
        return "merged" if cfg is not None and str(cfg.llm.adapter) != "none" else "none"

    def metadata(self) -> dict:
        cfg = self.loaded.run_config
        tags = list(BASE_TAGS)
        if cfg is not None:
            tags.append(f"stage-{cfg.stage.name}")
        model_type = getattr(self.text_config, "model_type", None)
        if model_type:
            tags.append(str(model_type))
        if self.adapter != "none":
            tags.append("lora")
        if self.adapter == "merged":
            tags.append("merged-lora")
        if cfg is not None and distill_active(cfg):
            tags.append("distillation")
        meta = {"license": self.license, **self.license_extra, "library_name": "transformers" if self.fmt == "hf" else "panda",
                "pipeline_tag": PIPELINE_TAG}
        if self.base_model:
            meta["base_model"] = self.base_model
        meta["tags"] = list(dict.fromkeys(tags))
        return meta

    # ------------------------------------------------------------------ body

    def body(self) -> list[str]:
        cfg = self.loaded.run_config
        name = os.path.basename(os.path.normpath(self.out_dir)) or "panda model"
        llm_class = type(self.llm).__name__
        lines = [f"# {name}", "",
                 f"A video-language model of the Video-Panda kind ([arXiv 2412.18609](https://arxiv.org/abs/2412.18609)), "
                 f"exported by panda in its {'Hugging Face (transformers) format' if self.fmt == 'hf' else 'release format'}. "
                 "There is no image encoder: STAB (the Spatio-Temporal Alignment Block) turns the frames of a video into "
                 f"visual tokens, a projector maps them into the input space of the LLM (`{llm_class}`), and the LLM "
                 "answers a question about the video in text.", ""]
        if cfg is not None:
            lines += [f"Trained by panda's `train.py`, stage `{cfg.stage.name}` ({self._steps_done()}).", ""]
        lines += ["This card was generated by `panda export` from the checkpoint's stored config and the files of its run "
                  "folder; paths are as the run configured them.", ""]
        return lines + self._model() + self._training() + self._results() + self._loading() + self._provenance()

    def _steps_done(self) -> str:
        step = self.meta.get("global_step")
        return f"{step} optimiser steps" if step is not None else "steps unknown"

    def _model(self) -> list[str]:
        cfg, tc, model = self.loaded.run_config, self.text_config, self.loaded.model
        if self.base_source:
            origin = f"weights from `{self.base_source}`"
        elif cfg is not None:
            origin = f"built from sizes (random initialisation, llm.hidden_size={cfg.llm.hidden_size}, llm.layers={cfg.llm.layers})"
        else:
            origin = "unknown (no run config)"
        adapter = {"none": "none", "unmerged": "LoRA adapters, not merged"}.get(self.adapter)
        if adapter is None:
            lora = cfg.llm.lora
            adapter = (f"{cfg.llm.adapter} adapters (rank {lora.rank}, alpha {lora.alpha:g}, on "
                       f"{', '.join(lora.target_modules)}) merged into the LLM's weights at export: a plain "
                       f"`{type(self.llm).__name__}`, no peft needed")
        vocab = getattr(tc, "vocab_size", None)
        tokens = len(self.loaded.tokenizer) if self.loaded.tokenizer is not None else None
        counts = model.parameter_counts()
        distill = getattr(model, "distill_head", None)
        rows = [
            ("LLM", f"`{type(self.llm).__name__}` (model type `{getattr(tc, 'model_type', '?')}`), {origin}"),
            ("LLM width", _fmt(getattr(tc, "hidden_size", None))),
            ("LLM layers", _fmt(getattr(tc, "num_hidden_layers", None))),
            ("attention heads", f"{_fmt(getattr(tc, 'num_attention_heads', None))} "
                                f"(key/value heads {_fmt(getattr(tc, 'num_key_value_heads', None))})"),
            ("vocabulary", f"{_fmt(vocab)} embeddings" + (f", tokenizer of {_fmt(tokens)} tokens" if tokens else "")),
            ("LoRA", adapter),
            ("projector", f"`{model.projector_kind}`"),
            ("distillation head", "none" if distill is None else
             f"kept (teacher width {distill.teacher_width}; used in training only)"),
            ("parameters", f"STAB {counts['params/stab']:,}, projector {counts['params/projector']:,}, "
                           f"LLM {counts['params/llm']:,}, distillation head {counts['params/distill_head']:,}; "
                           f"total {counts['params/total']:,}"),
        ]
        lines = ["## Model", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]
        stab = model.stab_cfg
        lines += ["### STAB", ""] + _stab_lines(stab) + [""]
        sampling = f", `{cfg.data.sampling}` sampling" if cfg is not None else ""
        if cfg is not None and str(cfg.data.sampling) != "release":
            sampling += f" (at most {cfg.data.max_frames} frames, {cfg.data.max_visual_tokens} visual tokens per video)"
        lines += [f"- Visual tokens per frame: {_tokens_per_frame(stab)}.",
                  f"- Frames per video: {self.loaded.frames}{sampling}.",
                  *([f"- Temporal compression ({_compression(stab)}): {self.loaded.frames} square frames give "
                     f"{stab.video_tokens(self.loaded.frames)} visual tokens instead of "
                     f"{self.loaded.frames * stab.max_tokens_per_frame()}."] if stab.compresses else []),
                  f"- Conversation template: `{self.loaded.template}` in training, `{self.loaded.eval_template}` to ask "
                  f"questions; tokenization `{self.loaded.tokenization}`"
                  + (f"; prompts cut at {cfg.model.max_length} text positions." if cfg is not None else "."), ""]
        return lines

    def _training(self) -> list[str]:
        cfg = self.loaded.run_config
        lines = ["## Training", ""]
        if cfg is None:
            return lines + ["Not recorded: this folder was not exported from a `train.py` checkpoint with a run config, so "
                            "the stages and data it was trained on are not known here.", ""]
        for i, (path, earlier, meta) in enumerate(self.earlier, 1):
            lines += [f"### Stage {i}: `{earlier.stage.name}`", "", f"Checkpoint `{path}`.", ""]
            lines += _stage_rows(earlier, meta, None) + [""]
        title = f"### Stage {len(self.earlier) + 1}: `{cfg.stage.name}` (this checkpoint)" if self.earlier else \
            f"### Stage `{cfg.stage.name}` (this checkpoint)"
        lines += [title, ""]
        derived = self.loaded.derived
        lines += _stage_rows(cfg, self.meta, derived.accumulate_grad_batches if derived else None) + [""]
        if str(cfg.init.kind) in ("release", "checkpoint") and not self.earlier:
            own = cfg.init.path and os.path.isfile(os.path.join(cfg.init.path, CARD))
            lines += [f"The run started from `{cfg.init.path}`; no earlier panda run was found there, so earlier stages "
                      "are not listed" + (f" (that folder's own `{CARD}` describes it)." if own else "."), ""]
        return lines

    def _results(self) -> list[str]:
        lines = ["## Results", "", "### Held-out split at the end of training", ""]
        cfg = self.loaded.run_config
        if self.heldout is None:
            lines += [f"None recorded: {self.heldout_note}.", ""]
        else:
            split = f"`{cfg.data.eval_qa}` under `{cfg.data.root}`" if cfg is not None else "the run's held-out split"
            lines += [f"Greedy answers to {split}, judged by the offline exact-match judge "
                      f"(`{self.heldout.get('judge', 'exact_match')}`: no judge model, so no fingerprint); "
                      f"{_counted(self.heldout)}. Intervals: 95% bootstrap over questions (2000 resamples, seed 0), "
                      "recomputed from the run's `heldout/judgements.jsonl`.", ""]
            lines += metrics_table(self.heldout) + [""]
        lines += ["### Benchmarks (`evaluate.py`)", ""]
        if not self.results:
            return lines + ["None recorded: no `results.json` written by `evaluate.py` for this checkpoint was found in "
                            "its run folder or under `outputs/evaluate/`.", ""]
        for path, res in self.results:
            judge = res.get("judge") or {}
            fingerprint = judge.get("fingerprint") or {}
            dec = res.get("decoding") or {}
            where = os.path.relpath(path, self.run_dir) if self.run_dir and _same_path(
                os.path.commonpath([os.path.realpath(path), os.path.realpath(self.run_dir)]), self.run_dir) else path
            lines += [f"From `{where}` ({_date(os.path.getmtime(path))}): {res.get('frames')} frames, greedy, "
                      f"max {dec.get('max_new_tokens')} new tokens, template `{dec.get('template')}`; evaluated at "
                      f"commit `{res.get('git_commit') or 'unknown'}`.", "",
                      f"Judge: `{judge.get('model')}` (kind `{judge.get('kind')}`"
                      + (f", revision `{fingerprint['revision']}`" if fingerprint.get("revision") else "")
                      + f", prompts `{judge.get('prompt_version')}`"
                      + (f", served as {', '.join(f'`{m}`' for m in judge['served_models'])}" if judge.get("served_models") else "")
                      + "); fingerprint "
                      + (f"`{judge['fingerprint_id']}`" if judge.get("fingerprint_id") else "none (an offline judge)") + ".", ""]
            for bench, metrics in res["benchmarks"].items():
                lines += [f"`{bench}`: {_counted(metrics)}.", ""] + metrics_table(metrics) + [""]
        return lines

    def _loading(self) -> list[str]:
        lines = ["## How to load", "",
                 "`FOLDER` is this folder (a local path; after `hf download REPO_ID --local-dir FOLDER` for a copy on the "
                 "Hugging Face Hub).", ""]
        transformers_snippet = ["```python",
                                "from transformers import AutoModelForCausalLM, AutoProcessor",
                                "",
                                'model = AutoModelForCausalLM.from_pretrained("FOLDER", trust_remote_code=True)',
                                'processor = AutoProcessor.from_pretrained("FOLDER", trust_remote_code=True)',
                                'inputs = processor(video="clip.mp4", text="What is happening?", return_tensors="pt")',
                                "answer = model.generate(**inputs, max_new_tokens=64)",
                                "print(processor.batch_decode(answer, skip_special_tokens=True)[0])",
                                "```", ""]
        panda_snippet = ["```bash",
                         'panda chat --checkpoint FOLDER --video clip.mp4 "What is happening?"',
                         "```", "",
                         "```python",
                         "from panda.loading import load_model",
                         "from panda.models.checkpoints import load_release",
                         "",
                         'loaded = load_model("FOLDER")  # model, tokenizer, frames per video, prompt template',
                         'model, report = load_release("FOLDER")  # the model alone',
                         "```", ""]
        if self.fmt == "hf":
            return lines + ["With `transformers` alone (the folder carries its own code, hence `trust_remote_code=True`):",
                            ""] + transformers_snippet + [
                "With panda installed, its own commands read this folder as well (with panda's own copy of the code):",
                ""] + panda_snippet[:4]
        source = f"`{self.checkpoint}`" if self.checkpoint else "the training checkpoint"
        return lines + ["With panda installed (the `panda` command):", ""] + panda_snippet + [
            "`AutoModelForCausalLM.from_pretrained(FOLDER)` loads the LLM alone from this folder; STAB, the projector "
            f"and the settings are beside it (`{PANDA_VISION_FILE}`, `{PANDA_META_FILE}`) in the release's key names.", "",
            f"A Hugging Face–native folder, which `transformers` loads without panda, is exported from {source} with:", "",
            "```bash",
            f"panda export {self.checkpoint or 'CKPT'} --out DIR --format hf",
            "```", "",
            "and loads as:", ""] + transformers_snippet

    def _provenance(self) -> list[str]:
        commit = "unknown" if self.commit == "unknown" else \
            f"`{self.commit}`" + (", with uncommitted changes to tracked files" if self.dirty else "")
        rows = [("panda version", self.panda_version), ("exported from commit", commit),
                ("trained at commit", f"`{self.trained_commit}`" if self.trained_commit else "unknown"),
                ("checkpoint", (f"`{self.checkpoint}`" + (f", step {self.meta['global_step']}" if self.meta.get("global_step") is not None else ""))
                 if self.checkpoint else "–"),
                ("format", f"`{self.fmt}`"),
                ("license", f"`{self.license}`" + (f": {self.license_note}" if self.license_note else "")),
                ("exported", _date(datetime.now(timezone.utc).timestamp()))]
        lines = ["## Provenance", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]
        if self.license == DEFAULT_LICENSE and self.base_source:
            lines += [f"The LLM's weights come from `{self.base_source}`: its license applies to them.", ""]
        return lines

    @property
    def panda_version(self) -> str:
        return panda_version()
