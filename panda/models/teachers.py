"""Frozen vision teachers for distillation (docs/model-reference.md, "Teachers").

A teacher sees the same sampled frames as STAB, preprocessed its own way (the long side at its
``image_size``, whole patches, CLIP normalisation — re-normalised here if the teacher uses other
statistics), and returns patch features on its square patch grid plus which patches lie inside
the pasted frame (:class:`~panda.models.distill.TeacherFeatures`). Teachers never train: they
stay in eval mode, hold no gradients, and run under ``torch.no_grad``.

- :class:`LanguageBindVideoTeacher` — the release's teacher: a CLIP ViT whose layers first add a
  per-frame temporal embedding and run pre-LN temporal self-attention across the frames of a chunk
  at each token position (residual), then the usual spatial attention and MLP. Loads the
  ``vision_model.*`` weights of a ``LanguageBind_Video_merge`` folder (other towers are skipped);
  without a folder it is built randomly from sizes (tests, tiny runs).
- :class:`HFVisionTeacher` — any Hugging Face CLIP-style vision model in a local folder (CLIP,
  SigLIP, DINOv2 …); prefix tokens (CLS, registers) are dropped.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from panda.constants import CLIP_MEAN, CLIP_STD
from panda.models.distill import TeacherFeatures
from panda.registry import Registry

log = logging.getLogger(__name__)


@dataclass
class TeacherConfig:
    """Which teacher distils STAB. Sizes are read from ``path``'s config when a folder is given."""

    kind: str = "none"  # none, or a registered teacher (TEACHERS): languagebind_video | hf_vision
    path: Optional[str] = None  # local folder with the teacher's weights
    random_init: bool = False  # languagebind_video without a folder: an untrained toy teacher (tests, demos)
    feature_layer: int = -2  # hidden-state index (0 = embeddings); -2 = second-to-last layer (release)
    # LanguageBind: consecutive frames of one video its temporal attention spans; None = num_frames (the
    # checkpoint's own grouping, 8 for LanguageBind_Video_merge, as in the release). A video with fewer
    # frames is one group.
    chunk_size: Optional[int] = None
    width: int = 1024
    layers: int = 24
    heads: int = 16
    intermediate_size: int = 4096
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "gelu"
    num_frames: int = 8  # temporal embeddings in the checkpoint (config.num_frames); a group uses the first T
    dtype: str = "float32"


def _activation(name: str) -> nn.Module:
    if name == "quick_gelu":
        from panda.models.stab import QuickGELU

        return QuickGELU()
    if name in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
        return nn.GELU(approximate="none" if name == "gelu" else "tanh")
    raise ValueError(f"unsupported teacher activation {name!r}")


class _Attention(nn.Module):
    """CLIP attention: q/k/v/out projections with bias, scale = head_dim^-0.5."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(width, width) for _ in range(3))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, L, d = x.shape

        def split(t):  # (n, L, d) -> (n, heads, L, d/heads)
            return t.view(n, L, self.heads, d // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)))
        return self.out_proj(out.transpose(1, 2).reshape(n, L, d))


class _MLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, hidden), _activation(act), nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _TemporalCLIPLayer(nn.Module):
    """A CLIP encoder layer with LanguageBind's temporal step in front (key names as released)."""

    def __init__(self, cfg: TeacherConfig, eps: float = 1e-5):
        super().__init__()
        d = cfg.width
        self.temporal_embedding = nn.Parameter(torch.zeros(1, cfg.num_frames, d))
        self.temporal_layer_norm1 = nn.LayerNorm(d, eps=eps)
        self.temporal_attn = _Attention(d, cfg.heads)
        self.layer_norm1 = nn.LayerNorm(d, eps=eps)
        self.self_attn = _Attention(d, cfg.heads)
        self.layer_norm2 = nn.LayerNorm(d, eps=eps)
        self.mlp = _MLP(d, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        bt, L, d = x.shape
        # (b*T, L, d) -> (b, T, L, d) -> (b*L, T, d): every token position attends across the chunk's frames
        x = x.view(bt // frames, frames, L, d).transpose(1, 2).reshape(-1, frames, d)
        x = x + self.temporal_embedding[:, :frames]
        x = x + self.temporal_attn(self.temporal_layer_norm1(x))
        x = x.view(bt // frames, L, frames, d).transpose(1, 2).reshape(bt, L, d)  # back to (b*T, L, d)
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _VisionModel(nn.Module):
    def __init__(self, cfg: TeacherConfig, eps: float = 1e-5):
        super().__init__()
        d, grid = cfg.width, cfg.image_size // cfg.patch_size
        self.embeddings = nn.Module()
        self.embeddings.patch_embedding = nn.Conv2d(3, d, cfg.patch_size, cfg.patch_size, bias=False)
        self.embeddings.class_embedding = nn.Parameter(torch.randn(d) * d**-0.5)
        self.embeddings.position_embedding = nn.Embedding(grid * grid + 1, d)
        self.pre_layrnorm = nn.LayerNorm(d, eps=eps)  # (sic) the CLIP checkpoint name
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(_TemporalCLIPLayer(cfg, eps) for _ in range(cfg.layers))
        self.post_layernorm = nn.LayerNorm(d, eps=eps)


class FrozenTeacher(nn.Module):
    """Base class: frozen, always in eval mode, features without gradients."""

    width: int
    image_size: int
    patch_size: int
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD

    @classmethod
    def check_config(cls, cfg: "TeacherConfig") -> None:
        """Raise ``ValueError`` naming the key and the fix if ``cfg`` cannot build this teacher."""

    @classmethod
    def from_config(cls, cfg: "TeacherConfig") -> "FrozenTeacher":
        """Build (and load) the teacher ``cfg`` describes."""
        raise NotImplementedError

    def freeze(self) -> "FrozenTeacher":
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True):  # a teacher never leaves eval mode (dropout, batch norm)
        return super().train(False)

    def renormalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised pixels -> this teacher's normalisation."""
        if tuple(self.mean) == tuple(CLIP_MEAN) and tuple(self.std) == tuple(CLIP_STD):
            return pixels
        shape = (1,) * (pixels.ndim - 3) + (3, 1, 1)
        clip_m, clip_s = torch.tensor(CLIP_MEAN).view(shape), torch.tensor(CLIP_STD).view(shape)
        own_m, own_s = torch.tensor(self.mean).view(shape), torch.tensor(self.std).view(shape)
        dev = pixels.device
        return ((pixels * clip_s.to(dev) + clip_m.to(dev)) - own_m.to(dev)) / own_s.to(dev)

    def patch_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, F, 3, r, r) -> (B*F, g, g, t)."""
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor, mask: torch.Tensor) -> TeacherFeatures:
        """pixels (B, F, 3, r, r) CLIP-normalised, mask (B, F, r, r) -> features of valid patches."""
        dtype = next(self.parameters()).dtype
        grid = self.patch_features(self.renormalise(pixels).to(dtype))
        valid = F.avg_pool2d(mask.flatten(0, 1)[:, None].float(), self.patch_size)[:, 0] > 0.5  # (B*F, g, g)
        return TeacherFeatures(grid.float(), valid)


def _hidden_index(layer: int, layers: int) -> int:
    index = layer if layer >= 0 else layers + 1 + layer
    if not 0 <= index <= layers:
        raise ValueError(f"teacher.feature_layer={layer} is outside the {layers + 1} hidden states")
    return index


# ---------------------------------------------------------------------------- the registry
# Adding a teacher = one FrozenTeacher subclass decorated with @TEACHERS.register("kind") (its
# check_config and from_config) + one yaml in a teacher config folder setting ``kind``.
TEACHERS: Registry[type[FrozenTeacher]] = Registry("teacher", "teacher.kind", "panda.models.teachers.TEACHERS")


def check_teacher_config(cfg: TeacherConfig) -> None:
    """``ValueError`` naming the key and the fix when ``cfg`` cannot build its teacher."""
    if cfg.kind == "none":
        return
    TEACHERS[cfg.kind].check_config(cfg)


@TEACHERS.register("languagebind_video")
class LanguageBindVideoTeacher(FrozenTeacher):
    """LanguageBind-Video (ViT-L/14 with temporal attention).

    As in the release (docs/model-reference.md, "Teachers"), the temporal attention of every layer
    runs over groups of the checkpoint's ``num_frames`` consecutive frames of one video (all 8
    frames of an 8-frame video, temporal embeddings 0-7), not over STAB's chunks;
    ``teacher.chunk_size`` overrides the group.
    """

    @classmethod
    def check_config(cls, cfg: TeacherConfig) -> None:
        if not cfg.path and not cfg.random_init:
            raise ValueError(
                "teacher=languagebind_video needs teacher.path=/path/to/LanguageBind_Video_merge "
                "(teacher.random_init=true builds an untrained toy teacher instead)"
            )

    @classmethod
    def from_config(cls, cfg: TeacherConfig) -> "LanguageBindVideoTeacher":
        sized = _languagebind_sizes(cfg) if cfg.path else cfg
        teacher = cls(sized)
        if cfg.path:
            from panda.models.checkpoints import read_weights

            state = read_weights(cfg.path)
            own = teacher.state_dict()
            mine = {k: v for k, v in state.items() if k in own}
            skipped = sorted({k.split(".")[0] for k in state if k not in own})
            missing = [k for k in own if k not in mine]
            if missing:
                raise KeyError(f"{cfg.path}: LanguageBind weights lack {len(missing)} keys, e.g. {missing[:5]}")
            teacher.load_state_dict(mine)
            log.info("teacher: loaded %d tensors from %s (skipped towers: %s)", len(mine), cfg.path, skipped or "-")
        return teacher

    def __init__(self, cfg: TeacherConfig, group: int | None = None):
        super().__init__()
        self.cfg = cfg
        group = self.group = group or cfg.chunk_size or cfg.num_frames  # frames per temporal-attention group
        self.width, self.image_size, self.patch_size = cfg.width, cfg.image_size, cfg.patch_size
        self.depth = _hidden_index(cfg.feature_layer, cfg.layers)  # layers to run
        if group > cfg.num_frames:
            raise ValueError(f"teacher.chunk_size={group} frames > the teacher's {cfg.num_frames} temporal embeddings "
                             f"(its num_frames)")
        self.vision_model = _VisionModel(cfg)

    def patch_features(self, pixels: torch.Tensor) -> torch.Tensor:
        B, Fr = pixels.shape[:2]
        T = min(self.group, Fr)  # a video shorter than the group is one group
        if Fr % T:
            raise ValueError(f"{Fr} frames per video do not split into the teacher's groups of {T} frames "
                             f"(its num_frames={self.cfg.num_frames}); set teacher.chunk_size to a divisor of {Fr}")
        vm = self.vision_model
        x = vm.embeddings.patch_embedding(pixels.flatten(0, 1))  # (B*F, 3, r, r) -> (B*F, t, g, g)
        n, d, g, _ = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B*F, g*g, t)
        cls = vm.embeddings.class_embedding.expand(n, 1, d)
        x = torch.cat([cls, x], 1) + vm.embeddings.position_embedding.weight[None]
        x = vm.pre_layrnorm(x)
        for layer in vm.encoder.layers[: self.depth]:
            x = layer(x, T)  # rows are frames (b, f) in order: each run of T rows is one group of one video
        return x[:, 1:].reshape(n, g, g, d)  # drop CLS


@TEACHERS.register("hf_vision")
class HFVisionTeacher(FrozenTeacher):
    """A Hugging Face vision model (CLIP / SigLIP / DINOv2 …) from a local folder."""

    @classmethod
    def check_config(cls, cfg: TeacherConfig) -> None:
        if not cfg.path:
            raise ValueError("teacher=hf_vision needs teacher.path=/path/to/a/local/vision/model")

    @classmethod
    def from_config(cls, cfg: TeacherConfig) -> "HFVisionTeacher":
        return cls(cfg.path, cfg.feature_layer, getattr(torch, cfg.dtype))

    def __init__(self, path: str, feature_layer: int = -2, dtype: torch.dtype = torch.float32):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(path)
        model = AutoModel.from_pretrained(path, dtype=dtype)
        self.model = getattr(model, "vision_model", model)  # a full CLIP/SigLIP model: keep its vision tower
        vcfg = getattr(config, "vision_config", config)
        self.width, self.image_size, self.patch_size = vcfg.hidden_size, vcfg.image_size, vcfg.patch_size
        self.feature_layer = feature_layer
        _hidden_index(feature_layer, vcfg.num_hidden_layers)
        pre = os.path.join(path, "preprocessor_config.json")
        if os.path.exists(pre):
            with open(pre) as f:
                proc = json.load(f)
            self.mean = tuple(proc.get("image_mean", CLIP_MEAN))
            self.std = tuple(proc.get("image_std", CLIP_STD))

    def patch_features(self, pixels: torch.Tensor) -> torch.Tensor:
        flat = pixels.flatten(0, 1)
        out = self.model(pixel_values=flat, output_hidden_states=True)
        hidden = out.hidden_states[self.feature_layer]  # (B*F, prefix + g*g, t)
        g = self.image_size // self.patch_size
        return hidden[:, hidden.shape[1] - g * g :].reshape(flat.shape[0], g, g, -1)


def _languagebind_sizes(cfg: TeacherConfig) -> TeacherConfig:
    """Sizes from ``cfg.path``/config.json (its ``vision_config``), else ``cfg`` unchanged."""
    path = os.path.join(cfg.path, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{cfg.path} has no config.json; is teacher.path a LanguageBind_Video_merge folder?")
    with open(path) as f:
        raw = json.load(f)
    v = raw.get("vision_config", raw)
    return TeacherConfig(**{
        **cfg.__dict__,
        "width": v.get("hidden_size", cfg.width), "layers": v.get("num_hidden_layers", cfg.layers),
        "heads": v.get("num_attention_heads", cfg.heads), "intermediate_size": v.get("intermediate_size", cfg.intermediate_size),
        "image_size": v.get("image_size", cfg.image_size), "patch_size": v.get("patch_size", cfg.patch_size),
        "hidden_act": v.get("hidden_act", cfg.hidden_act), "num_frames": v.get("num_frames", cfg.num_frames),
    })


def build_teacher(cfg: TeacherConfig) -> FrozenTeacher | None:
    """The frozen teacher ``cfg`` names (in ``cfg.dtype``), or ``None`` for ``kind=none``."""
    check_teacher_config(cfg)
    if cfg.kind == "none":
        return None
    if cfg.path is not None and not os.path.isdir(cfg.path):
        raise FileNotFoundError(f"teacher.path={cfg.path} is not a folder")
    return TEACHERS[cfg.kind].from_config(cfg).to(getattr(torch, cfg.dtype)).freeze()
