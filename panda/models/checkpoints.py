"""Released weights in and out (docs/model-reference.md, "Release checkpoint format"), with the
key mapping in one place.

The release names STAB's parameters after the code it grew from (``lmhra1``, ``dec``,
``local_attention`` ...); panda's names say what each part is. :data:`STAB_KEY_MAP` pairs the
two; :func:`panda_to_release` and :func:`split_state` convert state dicts both ways.

- :func:`read_weights` reads a Hugging Face-style folder: ``*.safetensors`` or
  ``pytorch_model*.bin`` (``weights_only``), sharded with an index or not.
- :func:`load_release` turns a Video-Panda release folder (or one panda exported) into a
  :class:`~panda.models.video_lm.VideoLanguageModel`: LLM, STAB, projector, distillation head.
  The unused ``lmhra2.*``, teacher towers and the image-path aliases are reported and skipped;
  any other missing or unexpected key raises :class:`CheckpointKeyError` listing the keys.
- :func:`export_release` writes a Hugging Face folder (the LLM loads with
  ``AutoModelForCausalLM``; STAB, projector and head in release key names in
  ``panda_vision.safetensors`` beside it; ``panda.json`` for the settings), and
  :func:`export_trainable` a single small ``safetensors`` of STAB + projector + head.
- :func:`apply_eve_state` initialises stage 1 from EVE-7B-Pretrain (``vision_tower.*``,
  ``mm_projector.*``, ``vision_tower_compressor.*``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from panda.compat import load_distributed_checkpoint, model_from_config

log = logging.getLogger(__name__)

RELEASE_STAB_PREFIX = "model.video_tower."
RELEASE_PROJECTOR_PREFIX = "model.video_projector."
RELEASE_HEAD_PREFIX = "model.video_tower_compressor."
# EVE-7B-Pretrain names of the parts STAB shares with EVE (docs/model-reference.md, "EVE-7B-Pretrain names")
EVE_STAB_PREFIX = "model.vision_tower."
EVE_PROJECTOR_PREFIX = "model.mm_projector."
EVE_HEAD_PREFIX = "model.vision_tower_compressor."
# Frozen teachers stored inside release checkpoints: never part of the student. The release registers
# the teacher twice, the second time inside the head (EVE: inside vision_tower_compressor), and a saved
# folder may carry it under either name (docs/model-reference.md, "Keys that are skipped").
TEACHER_PREFIXES = ("model.video_teacher.", "model.image_teacher.", RELEASE_HEAD_PREFIX + "teacher_layer.",
                    EVE_HEAD_PREFIX + "teacher_layer.")
RELEASE_HEAD_LAYER_STRIDE = 4  # the release's head reads layers L, L-4, ..., whatever L is
# (docs/model-reference.md, "Layers and fusion")
# The release's image path shares STAB and projector with the video path (same tensors twice).
IMAGE_ALIAS_PREFIXES = (EVE_STAB_PREFIX, EVE_PROJECTOR_PREFIX, EVE_HEAD_PREFIX)
# STAB parts EVE has (patch, frame-query and row embeddings, LSD, FSRA), in panda names
EVE_SHARED_STAB = ("patch_embed.", "frame_query", "row_token", "lsd.attend.", "fsra.")
PANDA_VISION_FILE = "panda_vision.safetensors"
PANDA_META_FILE = "panda.json"

# (panda name prefix inside STAB, release name prefix inside model.video_tower.)
STAB_KEY_MAP: list[tuple[str, str]] = [
    ("patch_embed.", "patch_embedding."),
    ("frame_query", "class_embedding"),
    ("row_token", "split_embedding"),
    ("gstra.query", "temporal_cls_token"),
    ("fusion_logit", "balance"),
    ("lste.temporal_mixer.", "lmhra1.pos_embed."),
    ("lste.position_encoding.", "dpe."),
    ("gstra.attn.", "dec.attn."),
    ("gstra.norm_query.", "dec.ln_1."),
    ("gstra.norm_mlp.", "dec.ln_2."),
    ("gstra.norm_kv.", "dec.ln_3."),
    ("gstra.mlp.fc.", "dec.mlp.c_fc."),
    ("gstra.mlp.proj.", "dec.mlp.c_proj."),
    ("fusion_proj.", "proj."),
    ("lsd.attend.query_proj.", "local_attention.q."),
    ("lsd.attend.kv_proj.", "local_attention.kv."),
    ("lsd.attend.out_proj.", "local_attention.proj."),
    ("fsra.query_proj.", "global_attention.q."),
    ("fsra.kv_proj.", "global_attention.kv."),
    ("fsra.out_proj.", "global_attention.proj."),
    ("resampler.", "perceiver_resampler."),  # stab.lsd=perceiver (Table 9); not in the release
]

# Present in the release files but never used by its forward pass.
RELEASE_UNUSED_PREFIXES = ("lmhra2.",)


class CheckpointKeyError(KeyError):
    """A release state dict does not fit the panda model; lists the keys at fault."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # panda keys with no release tensor
    unexpected: list[str] = field(default_factory=list)  # release keys that map to nothing
    unused: list[str] = field(default_factory=list)  # known-unused release keys, skipped

    def summary(self) -> str:
        return (
            f"loaded {len(self.loaded)} tensors, skipped {len(self.unused)} known-unused "
            f"({', '.join(sorted({k.split('.')[0] for k in self.unused})) or '-'}), "
            f"missing {len(self.missing)}, unexpected {len(self.unexpected)}"
        )


def _rename(key: str, pairs: list[tuple[str, str]]) -> str | None:
    for src, dst in pairs:
        if key == src or (src.endswith(".") and key.startswith(src)):
            return dst + key[len(src) :]
    return None


def stab_key_to_release(key: str) -> str:
    new = _rename(key, STAB_KEY_MAP)
    if new is None:
        raise CheckpointKeyError(f"STAB parameter {key!r} has no release name; add it to STAB_KEY_MAP")
    return new


def panda_to_release(stab: nn.Module, projector: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """STAB (+ projector) state dict in the release's key names and shapes."""
    out = {RELEASE_STAB_PREFIX + stab_key_to_release(k): v for k, v in stab.state_dict().items()}
    if projector is not None:
        out.update({RELEASE_PROJECTOR_PREFIX + k: v for k, v in projector.state_dict().items()})
    return out


# ---------------------------------------------------------------------------- reading folders


class NotACheckpointError(FileNotFoundError):
    """A path that is not a checkpoint folder panda can read."""


def weight_files(folder: str) -> list[str]:
    """The weight files of a Hugging Face-style folder (shards from the index, or the single file),
    plus panda's ``panda_vision.safetensors`` when present."""
    if not os.path.isdir(folder):
        raise NotACheckpointError(f"{folder} is not a folder; pass a checkpoint folder (config.json + weights)")
    files: list[str] = []
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        path = os.path.join(folder, index)
        if os.path.exists(path):
            with open(path) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            lost = [s for s in shards if not os.path.exists(os.path.join(folder, s))]
            if lost:
                raise NotACheckpointError(f"{folder}: {index} names shards that are not there: {lost}")
            files = [os.path.join(folder, s) for s in shards]
            break
    else:
        for single in ("model.safetensors", "pytorch_model.bin"):
            if os.path.exists(os.path.join(folder, single)):
                files = [os.path.join(folder, single)]
                break
    extra = os.path.join(folder, PANDA_VISION_FILE)
    if os.path.exists(extra):
        files.append(extra)
    if not files:
        raise NotACheckpointError(
            f"{folder} holds no weights: expected model.safetensors, pytorch_model.bin, or shards with "
            "model.safetensors.index.json / pytorch_model.bin.index.json"
        )
    return files


def read_file_weights(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def read_weights(folder: str) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        state.update(read_file_weights(path))
    return state


def read_meta(folder: str) -> dict:
    path = os.path.join(folder, PANDA_META_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def read_lightning_checkpoint(path: str) -> dict:
    """A ``train.py`` checkpoint as one dict: a single ``.ckpt`` file, or the folder of a sharded
    (FSDP, distributed) checkpoint, consolidated in memory without a process group."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path} (a train.py run keeps it at RUN_DIR/checkpoints/last.ckpt)")
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, ".metadata")):
            raise NotACheckpointError(f"{path} is a folder but not a distributed checkpoint (no .metadata)")
        return load_distributed_checkpoint(path)
    return torch.load(path, map_location="cpu", weights_only=False)  # Lightning checkpoints hold the config dict


def load_weights_from_ckpt(model: nn.Module, path: str, ckpt: dict | None = None) -> None:
    """Weights of a panda Lightning checkpoint into ``model`` (a ``VideoLanguageModel``; optimiser
    state is not restored)."""
    if ckpt is None:
        ckpt = read_lightning_checkpoint(path)
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    if any(".lora_" in k for k in state) and not any(".lora_" in k for k in model.state_dict()):
        raise KeyError(f"{path} holds LoRA adapters (llm.adapter=lora) and this model has none: export the checkpoint "
                       f"first, which merges them into the LLM (python -m panda.export {path} --out DIR), then start "
                       f"from init.kind=release init.path=DIR")
    if model.distill_head is None and any(k.startswith("distill_head.") for k in state):
        log.info("%s: skipping its distillation head (this run has no teacher)", path)
        state = {k: v for k, v in state.items() if not k.startswith("distill_head.")}
    head_fresh = model.distill_head is not None and not any(k.startswith("distill_head.") for k in state)
    result = model.load_state_dict(state, strict=not head_fresh)
    if head_fresh:
        log.warning("%s has no distillation head; the head starts fresh", path)
    bad = [k for k in result.missing_keys if not k.startswith("distill_head.")] + list(result.unexpected_keys)
    if bad:
        raise KeyError(f"{path} does not match the model: {bad[:20]}")


def empty_llm_from_config(config, dtype: torch.dtype, model_class=None) -> nn.Module:
    """A causal LM of ``config`` (of ``model_class`` when given, else the class transformers maps
    the config to) whose weights are allocated but not randomly initialised (they are loaded next;
    initialising 7B parameters first would take minutes)."""
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
    except ImportError:  # pragma: no cover - transformers 4.x
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        if model_class is not None:
            return model_from_config(model_class, config, dtype)
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def empty_llm_from_folder(folder: str, dtype: str | None = None, attn_implementation: str = "sdpa") -> nn.Module:
    """The causal LM a release/EVE/exported folder's ``config.json`` describes, allocated but not
    initialised (built inside ``torch.device("meta")``: its structure only); nothing is read
    but the config.

    A ``model_type`` that is not one of transformers' own causal LMs (the release's
    ``videopanda_llama``, EVE's) is read as a LLaMA config and built as ``LlamaForCausalLM``
    explicitly: even when the official package, imported in the same process, has registered its
    own wrapper under that type, the LLM is the plain LLaMA inside it.
    """
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cfg_path = os.path.join(folder, "config.json")
    if not os.path.exists(cfg_path):
        raise NotACheckpointError(f"{folder} has no config.json; is it a Hugging Face / Video-Panda checkpoint folder?")
    with open(cfg_path) as f:
        raw = json.load(f)
    model_class = None
    if raw.get("model_type") in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        config = AutoConfig.from_pretrained(folder, attn_implementation=attn_implementation)
    else:
        config = LlamaConfig(**{k: v for k, v in raw.items() if k not in ("model_type", "architectures", "auto_map")}
                             | {"attn_implementation": attn_implementation})
        model_class = LlamaForCausalLM
        log.info("%s: model_type %r is not a transformers causal LM; reading it as LLaMA", folder, raw.get("model_type"))
    torch_dtype = getattr(torch, dtype) if dtype else getattr(config, "dtype", None) or torch.float32
    if isinstance(torch_dtype, str):
        torch_dtype = getattr(torch, torch_dtype)
    return empty_llm_from_config(config, torch_dtype, model_class)


def load_llm_from_folder(folder: str, state: dict[str, torch.Tensor], dtype: str | None = None,
                         attn_implementation: str = "sdpa") -> nn.Module:
    """The causal LM of a release/EVE/exported folder (:func:`empty_llm_from_folder`), filled
    from ``state`` (keys ``model.embed_tokens``, ``model.layers.N``, ``model.norm``, ``lm_head``)."""
    llm = empty_llm_from_folder(folder, dtype, attn_implementation)  # every tensor is overwritten below
    own = llm.state_dict()
    config = llm.config
    tied = set(llm.get_expanded_tied_weights_keys()) if getattr(config, "tie_word_embeddings", False) else set()
    mine = {k: v for k, v in state.items() if k in own}
    missing = [k for k in own if k not in mine and k not in tied]
    if missing:
        raise CheckpointKeyError(f"{folder}: the LLM weights lack {len(missing)} keys: {missing[:20]}")
    bad = [f"{k}: file {tuple(v.shape)} vs config {tuple(own[k].shape)}" for k, v in mine.items() if v.shape != own[k].shape]
    if bad:
        raise CheckpointKeyError(f"{folder}: LLM weights do not fit its config.json: {bad[:10]}")
    llm.load_state_dict(mine, strict=False)
    if tied:
        llm.tie_weights()
    return llm


def tie_if_tied(llm: nn.Module) -> nn.Module:
    """``llm`` with its output embedding tied to its input embedding when its config says so (a model
    built without initialisation is not tied yet)."""
    if getattr(llm.config, "tie_word_embeddings", False):
        llm.tie_weights()
    return llm


def empty_llm_from_pretrained(folder: str, vocab: int, dtype: str = "float32", attn_implementation: str = "sdpa") -> nn.Module:
    """The causal LM ``AutoModelForCausalLM.from_pretrained(folder)`` builds (``llm.pretrained``), its
    embeddings resized to ``vocab`` rows when it has fewer, allocated but not initialised: built
    inside ``torch.device("meta")`` it is the structure only, from ``config.json`` (no weight is read)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, attn_implementation=attn_implementation)
    llm = tie_if_tied(empty_llm_from_config(config, getattr(torch, dtype)))
    if llm.get_input_embeddings().num_embeddings < vocab:
        llm.resize_token_embeddings(vocab, mean_resizing=False)  # the values come from the rank that read them
    return llm.train()


# ---------------------------------------------------------------------------- release state <-> model


def split_state(state: dict[str, torch.Tensor], llm_keys: set[str] | None) -> tuple[dict, LoadReport]:
    """Sort a release state dict into panda parts: ``{"stab": …, "projector": …, "distill_head": …}``.

    LLM keys (``llm_keys``) are left out; lmhra2, teachers and image aliases go to ``report.unused``;
    anything else to ``report.unexpected``.
    """
    inverse = [(dst, src) for src, dst in STAB_KEY_MAP]
    parts: dict[str, dict] = {"stab": {}, "projector": {}, "distill_head": {}}
    report = LoadReport()
    has_video = any(k.startswith(RELEASE_STAB_PREFIX) for k in state)
    for key, value in state.items():
        if llm_keys is not None and key in llm_keys:
            continue
        if key.startswith(RELEASE_STAB_PREFIX):
            inner = key[len(RELEASE_STAB_PREFIX) :]
            if inner.startswith(RELEASE_UNUSED_PREFIXES):
                report.unused.append(key)
                continue
            new = _rename(inner, inverse)
            (parts["stab"].__setitem__(new, value) if new is not None else report.unexpected.append(key))
        elif key.startswith(RELEASE_PROJECTOR_PREFIX):
            parts["projector"][key[len(RELEASE_PROJECTOR_PREFIX) :]] = value
        elif key.startswith(TEACHER_PREFIXES) or (has_video and key.startswith(IMAGE_ALIAS_PREFIXES)):
            report.unused.append(key)
        elif key.startswith(RELEASE_HEAD_PREFIX):
            parts["distill_head"][key[len(RELEASE_HEAD_PREFIX) :]] = value
        else:
            report.unexpected.append(key)
    return parts, report


def apply_release_state(model: nn.Module, state: dict[str, torch.Tensor], llm_keys: set[str] | None = None,
                        strict: bool = True, source: str = "checkpoint") -> LoadReport:
    """Load STAB, projector and distillation head of ``model`` from a release-named state dict.

    A model without a head skips the checkpoint's head (reported as unused); a model with a head
    and a checkpoint without one keeps the fresh head (logged). Everything else missing, unexpected
    or of the wrong shape raises :class:`CheckpointKeyError` when ``strict``.
    """
    parts, report = split_state(state, llm_keys)
    problems = []
    head = getattr(model, "distill_head", None)
    if head is None and parts["distill_head"]:
        report.unused += [RELEASE_HEAD_PREFIX + k for k in parts["distill_head"]]
    targets = [("stab", model.stab, RELEASE_STAB_PREFIX), ("projector", model.projector, RELEASE_PROJECTOR_PREFIX)]
    if head is not None:
        if parts["distill_head"]:
            targets.append(("distill_head", head, RELEASE_HEAD_PREFIX))
        else:
            log.warning("%s has no distillation head (%s*); the head starts fresh", source, RELEASE_HEAD_PREFIX)

    def release_name(part, key):
        return prefix + (_rename(key, STAB_KEY_MAP) or key if part == "stab" else key)

    for part, module, prefix in targets:
        sub, own = parts[part], module.state_dict()
        report.unexpected += [release_name(part, k) for k in sub if k not in own]
        problems += [f"{release_name(part, k)}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                     for k, v in sub.items() if k in own and own[k].shape != v.shape]
        report.missing += [release_name(part, k) for k in own if k not in sub]
        fitting = {k: v for k, v in sub.items() if k in own and own[k].shape == v.shape}
        module.load_state_dict(fitting, strict=False)
        report.loaded += [release_name(part, k) for k in fitting]
    if strict and (report.missing or report.unexpected or problems):
        lines = []
        if report.missing:
            lines.append(f"missing in checkpoint ({len(report.missing)}): {report.missing}")
        if report.unexpected:
            lines.append(f"unexpected in checkpoint ({len(report.unexpected)}): {report.unexpected}")
        if problems:
            lines.append(f"shape mismatches: {problems}")
        raise CheckpointKeyError(
            f"{source} does not match the model (check stab.* sizes and ablation switches, model.projector, "
            "distill.layer_stride and the teacher width):\n  " + "\n  ".join(lines)
        )
    log.info("%s: %s", source, report.summary())
    return report


def apply_eve_state(model: nn.Module, state: dict[str, torch.Tensor], source: str = "EVE checkpoint") -> LoadReport:
    """Stage-1 initialisation from EVE-7B-Pretrain: the STAB parts EVE shares, the projector and
    (when the model has one) the distillation head. The other STAB parts stay freshly initialised;
    a shared part missing from the file is an error."""
    renames = [(EVE_STAB_PREFIX, RELEASE_STAB_PREFIX), (EVE_PROJECTOR_PREFIX, RELEASE_PROJECTOR_PREFIX),
               (EVE_HEAD_PREFIX, RELEASE_HEAD_PREFIX)]
    renamed = {}
    for key, value in state.items():
        for src, dst in renames:
            if key.startswith(src):
                renamed[dst + key[len(src) :]] = value
                break
    report = apply_release_state(model, renamed, strict=False, source=source)
    shared_missing = [k for k in report.missing if k.startswith(RELEASE_STAB_PREFIX)
                      and _rename(k[len(RELEASE_STAB_PREFIX) :], [(d, s) for s, d in STAB_KEY_MAP]).startswith(EVE_SHARED_STAB)]
    other_missing = [k for k in report.missing if not k.startswith(RELEASE_STAB_PREFIX)]
    if shared_missing or other_missing or report.unexpected:
        raise CheckpointKeyError(
            f"{source} lacks parts stage 1 starts from: missing {shared_missing + other_missing}, "
            f"unexpected {report.unexpected}"
        )
    fresh = sorted({k[len(RELEASE_STAB_PREFIX) :].split(".")[0] for k in report.missing})
    log.info("%s: loaded %d tensors; fresh STAB parts: %s", source, len(report.loaded), ", ".join(fresh) or "-")
    return report


# ---------------------------------------------------------------------------- load / export


def model_meta(model: nn.Module, frames: int | None = None, **extra) -> dict:
    """What a folder needs besides tensors to rebuild ``model``: STAB config, projector, head settings."""
    distill = getattr(model, "distill_head", None)
    return {
        "panda_format": 1,
        "stab": dataclasses.asdict(model.stab_cfg),
        "projector": model.projector_kind,
        "distill": None if distill is None else {
            "layer_stride": model.distill_cfg.layer_stride, "heads": model.distill_cfg.heads,
            "teacher_width": distill.teacher_width,
        },
        "frames": frames,
        **extra,
    }


def vision_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """STAB + projector + head in release key names (the trainable parts of stage 1)."""
    out = panda_to_release(model.stab, model.projector)
    if getattr(model, "distill_head", None) is not None:
        out.update({RELEASE_HEAD_PREFIX + k: v for k, v in model.distill_head.state_dict().items()})
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def export_release(model: nn.Module, out_dir: str, meta: dict | None = None) -> str:
    """A Hugging Face folder: the LLM (``AutoModelForCausalLM.from_pretrained(out_dir)`` works), the
    panda parts beside it in release names and ``panda.json``; the caller adds the tokenizer
    (:func:`panda.data.tokenizer.save_tokenizer`)."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    model.llm.save_pretrained(out_dir, safe_serialization=True)
    save_file(vision_state(model), os.path.join(out_dir, PANDA_VISION_FILE), metadata={"format": "pt"})
    with open(os.path.join(out_dir, PANDA_META_FILE), "w") as f:
        json.dump(meta or model_meta(model), f, indent=2)
    return out_dir


def export_trainable(model: nn.Module, path: str, meta: dict | None = None) -> str:
    """One ``safetensors`` file with STAB + projector + head (release names); settings in its metadata."""
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(vision_state(model), path, metadata={"format": "pt", "panda": json.dumps(meta or model_meta(model))})
    return path


def load_release(path: str, stab_cfg=None, dtype: str | None = None, attn_implementation: str = "sdpa"):
    """A release-style folder -> ``(VideoLanguageModel, LoadReport)`` (the tokenizer beside it is
    loaded by :func:`panda.loading.load_model`).

    The STAB config comes from ``stab_cfg``, else the folder's ``panda.json`` (panda exports),
    else the release values (docs/model-reference.md, "Notation and release sizes") with the width read from
    the weights. The distillation head
    is built when the folder has one.
    """
    from panda.models.distill import DistillConfig
    from panda.models.stab import STABConfig
    from panda.models.video_lm import VideoLanguageModel

    state = read_weights(path)
    meta = read_meta(path)
    if stab_cfg is None:
        if meta.get("stab"):
            stab_cfg = STABConfig(**meta["stab"])
        else:
            key = RELEASE_STAB_PREFIX + "class_embedding"
            if key not in state:
                raise CheckpointKeyError(f"{path} has no STAB weights ({key}); is it a Video-Panda checkpoint?")
            stab_cfg = STABConfig(width=state[key].shape[0])
    llm = load_llm_from_folder(path, state, dtype, attn_implementation)
    head_meta = meta.get("distill") or {}
    head_keys = [k for k in state if k.startswith(RELEASE_HEAD_PREFIX + "norm_layer.") and k.endswith(".1.weight")]
    distill, teacher_width = None, None
    if head_keys:
        layers = llm.config.num_hidden_layers
        teacher_width = state[RELEASE_HEAD_PREFIX + "input_layer.weight"].shape[0]
        stride = head_meta.get("layer_stride") or RELEASE_HEAD_LAYER_STRIDE  # panda exports say theirs
        picked = list(range(layers, -1, -stride))
        if len(picked) != len(head_keys):
            raise CheckpointKeyError(
                f"{path}: the distillation head has {len(head_keys)} layer norms (norm_layer.*), but layer stride "
                f"{stride} on this {layers}-layer LLM picks {len(picked)} layers {picked}; the release's head always "
                f"reads every 4th layer (L, L-4, ..., 0). Is config.json's num_hidden_layers the LLM the head was "
                f"trained with?")
        distill = DistillConfig(layer_stride=stride, heads=head_meta.get("heads", 8))
    model = VideoLanguageModel(stab_cfg, llm, projector=meta.get("projector", "mlp2x_gelu"), distill=distill,
                               teacher_width=teacher_width)
    model.to(next(llm.parameters()).dtype)
    report = apply_release_state(model, state, llm_keys=set(llm.state_dict()), source=path)
    model.eval()
    return model, report
