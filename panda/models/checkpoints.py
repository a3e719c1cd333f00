"""Released-weight key mapping (stab.md §9), in one place.

The release names STAB's parameters after the code it grew from (``lmhra1``, ``dec``,
``local_attention`` ...); panda's names say what each part is. :data:`STAB_KEY_MAP` pairs the
two; :func:`release_to_panda` and :func:`panda_to_release` convert state dicts both ways, and
:func:`load_release_vision` loads STAB + projector from a release state dict with a report of
missing, unexpected and known-unused keys.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

log = logging.getLogger(__name__)

RELEASE_STAB_PREFIX = "model.video_tower."
RELEASE_PROJECTOR_PREFIX = "model.video_projector."

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


def release_to_panda(state: dict[str, torch.Tensor]) -> tuple[dict, dict, LoadReport]:
    """Split a release state dict into (STAB state, projector state, report of what was skipped).

    Keys outside ``model.video_tower.`` / ``model.video_projector.`` (the LLM, the distillation
    head) are ignored here; known-unused STAB keys (``lmhra2.*``) go to ``report.unused``.
    """
    inverse = [(dst, src) for src, dst in STAB_KEY_MAP]
    stab_state, proj_state, report = {}, {}, LoadReport()
    for key, value in state.items():
        if key.startswith(RELEASE_STAB_PREFIX):
            inner = key[len(RELEASE_STAB_PREFIX) :]
            if inner.startswith(RELEASE_UNUSED_PREFIXES):
                report.unused.append(key)
                continue
            new = _rename(inner, inverse)
            if new is None:
                report.unexpected.append(key)
            else:
                stab_state[new] = value
        elif key.startswith(RELEASE_PROJECTOR_PREFIX):
            proj_state[key[len(RELEASE_PROJECTOR_PREFIX) :]] = value
    return stab_state, proj_state, report


def load_release_vision(stab: nn.Module, projector: nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> LoadReport:
    """Load STAB and projector weights from a release state dict.

    With ``strict`` any missing or unexpected key (other than the known-unused ``lmhra2.*``), or a
    shape mismatch, raises :class:`CheckpointKeyError` listing them.
    """
    stab_state, proj_state, report = release_to_panda(state)
    problems = []
    for module, sub, prefix in ((stab, stab_state, RELEASE_STAB_PREFIX), (projector, proj_state, RELEASE_PROJECTOR_PREFIX)):
        own = module.state_dict()
        for key, value in sub.items():
            if key not in own:
                report.unexpected.append(prefix + (_rename(key, STAB_KEY_MAP) or key if module is stab else key))
            elif own[key].shape != value.shape:
                problems.append(f"{key}: release {tuple(value.shape)} vs model {tuple(own[key].shape)}")
        missing = [k for k in own if k not in sub]
        report.missing += [prefix + (stab_key_to_release(k) if module is stab else k) for k in missing]
        fitting = {k: v for k, v in sub.items() if k in own and own[k].shape == v.shape}
        module.load_state_dict(fitting, strict=False)
        report.loaded += list(fitting)
    if strict and (report.missing or report.unexpected or problems):
        lines = []
        if report.missing:
            lines.append(f"missing in checkpoint ({len(report.missing)}): {report.missing}")
        if report.unexpected:
            lines.append(f"unexpected in checkpoint ({len(report.unexpected)}): {report.unexpected}")
        if problems:
            lines.append(f"shape mismatches: {problems}")
        raise CheckpointKeyError(
            "release checkpoint does not match the STAB/projector config "
            "(check stab.width, ablation switches and projector type):\n  " + "\n  ".join(lines)
        )
    log.info("release vision weights: %s", report.summary())
    return report
