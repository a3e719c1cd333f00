"""STAB, the Spatio-Temporal Alignment Block of Video-Panda (docs/model-reference.md), batched.

All frames of all videos in a batch go through each stage as one tensor, on one path for every
ablation switch: no Python loop over videos, frames or frame shapes, so the number of launched ops
does not grow with any of them.

Stages, in the paper's terms:

- patch embedding (Conv2d, stride = patch);
- **LSTE** local spatio-temporal encoding: temporal mixer + dynamic position encoding (DPE) on
  each chunk of ``chunk_size`` frames;
- **GSTRA** global spatio-temporal relation aggregation: one learned query per chunk attends over
  all of the chunk's tokens (the video context token);
- dense connection (LSTE output + raw patch embeddings);
- per frame: crop to the valid box, the **spatial reducer** (``stab.lsd``: LSD local spatial
  downsampling, learned attention inside s×s windows, in the release; :data:`REDUCERS` holds the
  others and takes new ones), **FSRA** frame-wise spatial relation aggregation (one learned query
  per frame), α-fusion of the video and frame context tokens, row (split) tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from panda.models.compress import compress
from panda.models.host import host_to_device
from panda.registry import Registry
from panda.tokens import frame_tokens, video_tokens


@dataclass
class STABConfig:
    """Sizes and ablation switches of STAB. Defaults are the released Video-Panda-7B values."""

    width: int = 1024  # d: the width of every STAB token (the projector maps it to the LLM's)
    patch_size: int = 14  # p: the side of a patch in pixels (one patch embedding per p×p pixels)
    heads: int = 8  # attention heads of LSD, FSRA and GSTRA (width must divide by it)
    lsd_window: int = 2  # s: LSD makes one token of each s×s window of patches
    chunk_size: int = 4  # T: frames per chunk, each chunk one LSTE volume and one GSTRA context token
    resolution: int = 448  # square canvas side, = ratio × teacher resolution
    ratio: int = 2  # STAB resolution / teacher resolution
    mixer_ratio: float = 1.5  # temporal mixer hidden = int(d / mixer_ratio) (682 in the release)
    dropout: float = 0.5  # GSTRA MLP and fusion projection dropout
    # ablation switches (docs/model-reference.md, "Ablation switches"); each removes computation and parameters
    use_lste: bool = True  # LSTE: temporal mixer + dynamic position encoding on each chunk
    use_gstra: bool = True  # GSTRA: one video context token per chunk
    use_fsra: bool = True  # FSRA: one frame context token per frame
    row_tokens: bool = True  # a learned split token after each row of a frame's tokens
    # the spatial reducer, how a frame's patches become its tokens (REDUCERS): attention (LSD, the release) |
    # avgpool | none (every patch) | perceiver (Table 9's resampler) | one registered from a plugin module
    lsd: str = "attention"
    lsd_before_lste: bool = False  # run the spatial reducer on the whole canvas before LSTE/GSTRA (Table 4)
    # temporal token compression on STAB's output (panda/models/compress.py), off by default; one at a time:
    # each frame after a video's first keeps this fraction of its spatial tokens (those that changed most),
    # merging the rest into the earlier tokens at their place (ToMe-style); None: off
    merge_keep: Optional[float] = None
    temporal_pool: int = 1  # every k frames share one grid of spatial tokens (their mean) plus their own context tokens

    def validate(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"stab.width={self.width} must be divisible by stab.heads={self.heads}")
        reducer = self.reducer  # a registered spatial reducer (else: the names there are, and how to add one)
        if self.resolution % (self.patch_size * self.ratio):
            raise ValueError(
                f"stab.resolution={self.resolution} must be a multiple of patch_size*ratio="
                f"{self.patch_size * self.ratio}"
            )
        grid, s = self.resolution // self.patch_size, self.window
        if grid % s or (self.ratio % s and s % self.ratio):
            raise ValueError(
                f"the patch grid ({grid}) and ratio ({self.ratio}) must be compatible with "
                f"stab.lsd_window={self.lsd_window}"
            )
        if self.lsd_before_lste and not reducer.on_canvas:
            raise ValueError(f"stab.lsd={self.lsd} replaces LSD; stab.lsd_before_lste has no LSD to move")
        if self.chunk_size < 1:
            raise ValueError("stab.chunk_size must be >= 1")
        if self.merge_keep is not None and not 0 < self.merge_keep <= 1:
            raise ValueError(f"stab.merge_keep={self.merge_keep}: the fraction of spatial tokens a later frame keeps, "
                             "in (0, 1]; null turns merging off")
        if self.temporal_pool < 1:
            raise ValueError(f"stab.temporal_pool={self.temporal_pool}: frames that share one grid, >= 1 (1: off)")
        if self.compresses and not (reducer.keeps_layout and reducer.crops):
            raise ValueError(f"stab.lsd={self.lsd}: temporal compression matches tokens by their place in the frame; "
                             "this reducer's tokens have none (turn stab.merge_keep / stab.temporal_pool off)")
        if self.merge_keep is not None and self.temporal_pool > 1:
            raise ValueError("stab.merge_keep and stab.temporal_pool: choose one temporal compression")
        if self.temporal_pool > 1 and not self.has_context_token:
            raise ValueError(f"stab.temporal_pool={self.temporal_pool}: the frames after a group's first keep only "
                             "their context token, and with FSRA and GSTRA off there is none; keep stab.use_fsra=true")

    @property
    def compresses(self) -> bool:
        """Whether a temporal compression switch is on (``merge_keep`` or ``temporal_pool``)."""
        return self.merge_keep is not None or self.temporal_pool > 1

    @property
    def reducer(self) -> type[SpatialReducer]:
        """The spatial reducer class ``stab.lsd`` names."""
        return REDUCERS[self.lsd]

    @property
    def window(self) -> int:
        """The side of the patch windows one spatial token summarises (1 with stab.lsd=none)."""
        return self.reducer.window(self)

    @property
    def fixed_side(self) -> int:
        """A reducer that gives every frame one square grid of tokens (stab.lsd=perceiver): its side; else 0."""
        return self.reducer.fixed_side(self)

    def spatial_grid(self, patch_rows: int, patch_cols: int) -> tuple[int, int]:
        """(rows, cols) of spatial tokens of a frame whose valid region is ``patch_rows × patch_cols`` patches."""
        return self.reducer.grid(self, patch_rows, patch_cols)

    @property
    def has_context_token(self) -> bool:
        """A context token leads each frame when FSRA or GSTRA (which needs chunks of > 1 frame) runs."""
        return self.use_fsra or (self.chunk_size > 1 and self.use_gstra)

    def tokens_per_frame(self, rows: int, cols: int) -> int:
        """Visual tokens of a frame with ``rows × cols`` LSD tokens: context + rows, each with its row token
        (before temporal compression: a video's first frame, or every frame with it off)."""
        return frame_tokens(rows, cols, self.has_context_token, self.row_tokens)

    def video_tokens(self, frames: int, rows: int | None = None, cols: int | None = None) -> int:
        """Visual tokens of a video of ``frames`` frames with ``rows × cols`` LSD tokens each (default: a
        square frame's grid), after temporal compression: what the LLM gets."""
        if rows is None or cols is None:
            side = self.resolution // self.patch_size
            rows, cols = self.spatial_grid(side, side)
        return video_tokens(frames, rows, cols, self.has_context_token, self.row_tokens, self.merge_keep, self.temporal_pool)

    def max_tokens_per_frame(self) -> int:
        """Visual tokens of a square frame (the most any frame can have): 273 at release sizes."""
        side = self.resolution // self.patch_size
        return self.tokens_per_frame(*self.spatial_grid(side, side))


@dataclass
class VisualTokens:
    """Visual tokens of a batch, packed: frame (b, f)'s tokens are contiguous, in (b, f) order."""

    tokens: torch.Tensor  # (total_tokens, C)
    lengths: torch.Tensor  # (B, F) long: tokens per frame
    grids: list[tuple[int, int]] | None = None  # (rows, cols) of each frame's spatial tokens, (b, f) order
    content: torch.Tensor | None = None  # (B*F,) bool: the frame has valid pixels (not padding)
    host_lengths: np.ndarray | None = None  # (B, F) ``lengths`` on the host (what the splice plans with)
    host_content: np.ndarray | None = None  # (B*F,) ``content`` on the host, where STAB had it there

    def spatial_index(self, context_token: bool, row_tokens: bool) -> torch.Tensor:
        """Indices into ``tokens`` of the spatial tokens (context and row tokens left out), frame by
        frame in row-major order: what the distillation head reads. Planned on the host."""
        lengths = (self.host_lengths if self.host_lengths is not None else self.lengths.cpu().numpy()).reshape(-1)
        rows, cols = np.asarray(self.grids, dtype=np.int64).reshape(-1, 2).T  # (n,), (n,)
        sizes = rows * cols
        frame = np.repeat(np.arange(len(sizes)), sizes)  # frame of each spatial token
        within = np.arange(sizes.sum()) - (sizes.cumsum() - sizes)[frame]
        c = cols[frame]
        start = (lengths.cumsum() - lengths)[frame] + int(context_token)
        return host_to_device(start + (within // c) * (c + int(row_tokens)) + within % c, self.tokens.device)

    def per_frame(self) -> list[list[torch.Tensor]]:
        """``tokens`` split into [video][frame] tensors of shape (L_frame, C)."""
        lengths = self.host_lengths if self.host_lengths is not None else self.lengths.cpu().numpy()
        chunks = self.tokens.split(lengths.reshape(-1).tolist())
        F = self.lengths.shape[1]
        return [list(chunks[b * F : (b + 1) * F]) for b in range(self.lengths.shape[0])]


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class QueryAttentionPool(nn.Module):
    """One query attends over a set of tokens: ``query + W_o · Attn(W_q LN(query), W_kv LN(tokens))``.

    Used by LSD (query = window average, tokens = the window) and FSRA (query = the learned frame
    query, tokens = the frame's LSD tokens). The softmax scale is ``width ** -0.5`` — not the
    per-head width — because the released weights were trained that way.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.width, self.heads = width, heads
        self.query_proj = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width, bias=False))
        self.kv_proj = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width, bias=False))
        self.out_proj = nn.Linear(width, width)

    def forward(self, query: torch.Tensor, tokens: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        # query: (N, d), tokens: (N, L, d), key_mask: (N, L) bool, True = attend (None: all) -> (N, d)
        n, length, d = tokens.shape
        hd = d // self.heads
        q = self.query_proj(query).view(n, 1, self.heads, hd).transpose(1, 2)  # (N, heads, 1, hd)
        # (N, L, 2d) -> (2, N, heads, L, hd); unbind, not kv[0]/kv[1]: indexing makes backward zero-fill
        # a full-size gradient per index, unbind stacks the two gradients once
        k, v = self.kv_proj(tokens).view(n, length, 2, self.heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
        mask = key_mask[:, None, None, :] if key_mask is not None else None  # (N, 1, 1, L)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=d**-0.5)  # (N, heads, 1, hd)
        return query + self.out_proj(attn.reshape(n, d))


class SpatialReducer(nn.Module):
    """How the valid patches of each frame become its spatial tokens (``stab.lsd``; paper Tables 4 and 9).

    One call: ``reducer(grid, valid, host_valid, pooled)`` takes every frame's patch grid ``(N, g, g, d)``
    (after LSTE/GSTRA), its validity ``(N, g, g)`` on the device and, for a reducer that ``crops``,
    the same validity on the host (numpy), and returns every frame's spatial tokens packed ``(S, d)``,
    frame after frame, each frame's tokens row-major, with each frame's ``(rows, cols)``.
    STAB adds the context and row tokens around them. A reducer is registered in :data:`REDUCERS`
    under the name ``stab.lsd`` takes; its class says, without building it, how many tokens a frame
    gets (:meth:`window`, :meth:`fixed_side`), which the planner and the token budget count with.
    """

    attribute = "lsd"  # STAB's attribute for it, hence its state-dict prefix (``lsd.attend.*`` in the release)
    keeps_layout = True  # each token summarises a place in the frame (distillation matches them to the teacher's)
    on_canvas = True  # can run on the whole canvas before LSTE (``stab.lsd_before_lste``)
    crops = True  # crops each frame to its valid box, which it finds in ``host_valid``

    def __init__(self, cfg: STABConfig):
        super().__init__()

    @classmethod
    def window(cls, cfg: STABConfig) -> int:
        """The side of the patch windows one token summarises."""
        return cfg.lsd_window

    @classmethod
    def fixed_side(cls, cfg: STABConfig) -> int:
        """Every frame gets this square grid of tokens, whatever its shape; 0: the grid follows the crop."""
        return 0

    @classmethod
    def grid(cls, cfg: STABConfig, patch_rows: int, patch_cols: int) -> tuple[int, int]:
        """(rows, cols) of the tokens of a frame whose valid region is ``patch_rows × patch_cols`` patches."""
        side = cls.fixed_side(cfg)
        if side:
            return side, side
        s = cls.window(cfg)
        return patch_rows // s, patch_cols // s

    def forward(self, grid: torch.Tensor, valid: torch.Tensor, host_valid: np.ndarray | None,
                pooled: bool = False) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        raise NotImplementedError


class WindowReducer(SpatialReducer):
    """A reducer that crops each frame to its valid box and makes one token of each s×s window of
    patches (:meth:`pool`). Frames of several box shapes go through it at once: one gather of every
    frame's windows, one :meth:`pool`, a fixed number of ops whatever the shapes."""

    def __init__(self, cfg: STABConfig):
        super().__init__(cfg)
        self.side = self.window(cfg)

    def pool(self, windows: torch.Tensor) -> torch.Tensor:
        """(W, s*s, d) windows, row-major inside each -> (W, d) tokens."""
        raise NotImplementedError

    def downsample(self, x: torch.Tensor) -> torch.Tensor:
        """A whole (N, h, w, d) grid of patches -> (N, h/s, w/s, d) (the canvas, or one crop)."""
        n, h, w, d = x.shape
        s = self.side
        if h % s or w % s:
            raise ValueError(f"LSD window {s} does not divide the {h}x{w} patch crop")
        # (N, h, w, d) -> (N, h/s, s, w/s, s, d) -> (N, h/s, w/s, s, s, d) -> (N*h/s*w/s, s*s, d)
        windows = x.view(n, h // s, s, w // s, s, d).permute(0, 1, 3, 2, 4, 5).reshape(-1, s * s, d)
        return self.pool(windows).view(n, h // s, w // s, d)

    def forward(self, grid: torch.Tensor, valid: torch.Tensor, host_valid: np.ndarray | None, pooled: bool = False):
        # grid: (N, g, g, d), host_valid: (N, g, g) numpy -> tokens (S, d), [(rows, cols)] * N; ``pooled``:
        # the grid already went through downsample (stab.lsd_before_lste), so each patch is a token
        device, d = grid.device, grid.shape[-1]
        s = 1 if pooled else self.side
        box = crop_boxes(host_valid)  # (N, 4): top, left, h, w
        if ((box[:, 2] % s) | (box[:, 3] % s)).any():
            shapes = sorted({(int(h), int(w)) for h, w in box[:, 2:]})
            raise ValueError(f"LSD window {s} does not divide every patch crop: {shapes}")
        top, left, rows, cols = box[:, 0], box[:, 1], box[:, 2] // s, box[:, 3] // s
        count = rows * cols  # tokens per frame
        frame = np.repeat(np.arange(len(box)), count)  # frame of each token
        k = np.arange(count.sum()) - np.repeat(count.cumsum() - count, count)  # its index within the frame
        row0, col0 = top[frame] + k // cols[frame] * s, left[frame] + k % cols[frame] * s  # its window's first patch
        index = host_to_device(np.concatenate([frame, row0, col0]), device)  # one copy to the device
        frame_t, row0_t, col0_t = index.view(3, -1)
        if s == 1:
            tokens = grid[frame_t, row0_t, col0_t]  # (S, d)
        else:
            step = torch.arange(s, device=device)
            # (S, s, s, d): every token's window, row-major inside it
            windows = grid[frame_t[:, None, None], (row0_t[:, None] + step)[:, :, None], (col0_t[:, None] + step)[:, None, :]]
            tokens = self.pool(windows.reshape(-1, s * s, d))  # (S, d)
        return tokens, list(zip(rows.tolist(), cols.tolist()))


REDUCERS: Registry[type[SpatialReducer]] = Registry("spatial reducer", "stab.lsd", "panda.models.stab.REDUCERS")


@REDUCERS.register("attention")
class LocalSpatialDownsampler(WindowReducer):
    """LSD, the release: each s×s window becomes ``avg + attention over the window`` (the window
    average is the query)."""

    def __init__(self, cfg: STABConfig):
        super().__init__(cfg)
        self.attend = QueryAttentionPool(cfg.width, cfg.heads)

    def pool(self, windows: torch.Tensor) -> torch.Tensor:
        base = windows.mean(1)
        return self.attend(base, windows)


@REDUCERS.register("avgpool")
class AveragePool(WindowReducer):
    """s×s average pooling (Table 4's alternative to LSD); nothing learned."""

    def pool(self, windows: torch.Tensor) -> torch.Tensor:
        return windows.mean(1)


@REDUCERS.register("none")
class EveryPatch(WindowReducer):
    """Every patch is a token (Table 9's "w/o LSD": pair it with half the resolution, ``stab.ratio=1``)."""

    @classmethod
    def window(cls, cfg: STABConfig) -> int:
        return 1

    def pool(self, windows: torch.Tensor) -> torch.Tensor:
        return windows.mean(1)  # a 1×1 window: its patch


@REDUCERS.register("perceiver")
class PerceiverResampler(SpatialReducer):
    """Table 9's "w/o LSD (PR)": K learned latents per frame cross-attend to the frame's valid
    patches and to themselves (Flamingo's resampler, one layer: attention, then an MLP, each
    residual). K = the square frame's LSD grid, so every frame gets as many tokens as a square
    frame under LSD, whatever its aspect ratio."""

    attribute = "resampler"
    keeps_layout = False  # latents have no place in the frame
    on_canvas = False
    crops = False  # every frame's valid patches, under a key mask on the device

    @classmethod
    def fixed_side(cls, cfg: STABConfig) -> int:
        return cfg.resolution // cfg.patch_size // cfg.lsd_window

    def __init__(self, cfg: STABConfig):
        super().__init__(cfg)
        width, self.heads, self.side = cfg.width, cfg.heads, self.fixed_side(cfg)
        self.latents = nn.Parameter(torch.randn(self.side**2, width) * width**-0.5)
        self.norm_latents = nn.LayerNorm(width)
        self.norm_inputs = nn.LayerNorm(width)
        self.q_proj = nn.Linear(width, width, bias=False)
        self.kv_proj = nn.Linear(width, 2 * width, bias=False)
        self.out_proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def resample(self, patches: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        # patches: (N, L, d), key_mask: (N, L) bool (True = a valid patch) -> (N, K, d)
        n, length, d = patches.shape
        k_latents, hd = self.latents.shape[0], d // self.heads
        latents = self.norm_latents(self.latents).expand(n, k_latents, d)
        keys = torch.cat([self.norm_inputs(patches), latents], dim=1)  # (N, L + K, d)
        q = self.q_proj(latents).view(n, k_latents, self.heads, hd).transpose(1, 2)  # (N, heads, K, hd)
        k, v = self.kv_proj(keys).view(n, length + k_latents, 2, self.heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
        mask = torch.cat([key_mask, key_mask.new_ones(n, k_latents)], dim=1)[:, None, None, :]  # (N, 1, 1, L + K)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (N, heads, K, hd)
        x = self.latents + self.out_proj(attn.transpose(1, 2).reshape(n, k_latents, d))
        return x + self.mlp(x)

    def forward(self, grid: torch.Tensor, valid: torch.Tensor, host_valid: np.ndarray | None, pooled: bool = False):
        # grid: (N, g, g, d), valid: (N, g, g) -> tokens (N*K, d), [(side, side)] * N; no crop, nothing on the host
        valid = valid.flatten(1)  # (N, g*g)
        attend = valid | ~valid.any(1, keepdim=True)  # a padding frame attends everywhere (no empty softmax)
        latents = self.resample(grid.flatten(1, 2), attend)  # (N, g*g, d) -> (N, K, d)
        return latents.reshape(-1, latents.shape[-1]), [(self.side, self.side)] * grid.shape[0]


def crop_boxes(valid: np.ndarray) -> np.ndarray:
    """Bounding box (top, left, h, w) of the valid patches of each frame of ``valid`` (N, gh, gw), (N, 4);
    an empty (padding) frame gets the top-left half grid."""
    n, gh, gw = valid.shape
    rows, cols = valid.any(2), valid.any(1)  # (N, gh), (N, gw)
    boxes = np.stack([rows.argmax(1), cols.argmax(1), rows.sum(1), cols.sum(1)], 1).astype(np.int64)
    boxes[~rows.any(1)] = [0, 0, gh // 2, gw // 2]
    return boxes


def pool_valid(valid: np.ndarray, s: int) -> np.ndarray:
    """(N, g, g) patch validity -> (N, g/s, g/s): a window is valid when more than half its patches are."""
    n, gh, gw = valid.shape
    return valid.reshape(n, gh // s, s, gw // s, s).mean((2, 4)) > 0.5


class LocalSpatioTemporalEncoder(nn.Module):
    """LSTE on a chunk volume (N, d, T, h, w): temporal mixer, then DPE, each residual."""

    def __init__(self, width: int, mixer_ratio: float):
        super().__init__()
        hidden = int(width / mixer_ratio)
        self.temporal_mixer = nn.Sequential(
            nn.BatchNorm3d(width),
            nn.Conv3d(width, hidden, 1),
            nn.Conv3d(hidden, hidden, (3, 1, 1), padding=(1, 0, 0), groups=hidden),
            nn.Conv3d(hidden, width, 1),
        )
        self.position_encoding = nn.Conv3d(width, width, 3, padding=1, groups=width)  # DPE
        nn.init.zeros_(self.temporal_mixer[3].weight)
        nn.init.zeros_(self.temporal_mixer[3].bias)
        nn.init.zeros_(self.position_encoding.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.temporal_mixer(x)
        return x + self.position_encoding(x)


class GSTRAMlp(nn.Module):
    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(width, 4 * width)
        self.act = QuickGELU()
        self.drop = nn.Dropout(dropout)
        self.proj = nn.Linear(4 * width, width)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.drop(self.act(self.fc(x))))


class PackedCrossAttention(nn.Module):
    """Multi-head cross-attention with one packed q/k/v in-projection (``nn.MultiheadAttention``'s
    parameter names and initialisation), computed with two matmuls on contiguous inputs and SDPA.

    ``nn.MultiheadAttention(batch_first=True)`` transposes keys to (L, N, d) before projecting,
    which sends large batched inputs down a slow non-contiguous matmul path on CPU.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        # query: (N, Lq, d), keys (= values): (N, L, d) -> (N, Lq, d)
        n, lq, d = query.shape
        hd = d // self.heads
        w_q, w_kv = self.in_proj_weight.split([d, 2 * d])
        b_q, b_kv = self.in_proj_bias.split([d, 2 * d])
        q = F.linear(query, w_q, b_q).view(n, lq, self.heads, hd).transpose(1, 2)  # (N, heads, Lq, hd)
        k, v = F.linear(keys, w_kv, b_kv).view(n, keys.shape[1], 2, self.heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # scale head_dim ** -0.5
        return self.out_proj(out.transpose(1, 2).reshape(n, lq, d))


class VideoContextAggregator(nn.Module):
    """GSTRA: a learned query (zeros at init) cross-attends over all tokens of a chunk."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(1, 1, width))
        self.norm_query = nn.LayerNorm(width)
        self.norm_kv = nn.LayerNorm(width)
        self.attn = PackedCrossAttention(width, heads)  # out_proj.bias starts at 0
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = GSTRAMlp(width, dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens: (N, L, d) -> (N, d)
        q = self.query.expand(tokens.shape[0], -1, -1)
        g = q + self.attn(self.norm_query(q), self.norm_kv(tokens))
        g = g + self.mlp(self.norm_mlp(g))
        return g[:, 0]


class STAB(nn.Module):
    """Spatio-Temporal Alignment Block: frames + validity masks -> per-frame visual tokens.

    Each frame's sequence is ``[context, row_1, r, row_2, r, ..., row_h', r]`` of width ``d``. The
    forward is one path for every switch: patch embedding, (the spatial reducer on the whole canvas,
    ``stab.lsd_before_lste``), LSTE and GSTRA on chunks, the spatial reducer on each frame's crop,
    then :meth:`_assemble` (FSRA, α-fusion, row tokens) — a fixed number of ops whatever the
    number of frames, videos or frame shapes in the batch.
    """

    def __init__(self, cfg: STABConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d = cfg.width
        self.patch_embed = nn.Conv2d(3, d, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.temporal = cfg.chunk_size > 1
        self.lste = LocalSpatioTemporalEncoder(d, cfg.mixer_ratio) if self.temporal and cfg.use_lste else None
        self.gstra = VideoContextAggregator(d, cfg.heads, cfg.dropout) if self.temporal and cfg.use_gstra else None
        reducer = cfg.reducer(cfg)
        self._reducer_name = reducer.attribute  # ``lsd`` (release state-dict names) or ``resampler``
        setattr(self, reducer.attribute, reducer)
        if cfg.use_fsra:
            self.frame_query = nn.Parameter(torch.randn(d) * d**-0.5)
            self.fsra = QueryAttentionPool(d, cfg.heads)
        else:
            self.frame_query, self.fsra = None, None
        if self.gstra is not None:
            # context = proj((1 - α) ⊙ g + α ⊙ f), α = sigmoid(fusion_logit), 0.5 at init
            self.fusion_logit = nn.Parameter(torch.zeros(d)) if cfg.use_fsra else None
            self.fusion_proj = nn.Sequential(nn.LayerNorm(d), nn.Dropout(cfg.dropout), nn.Linear(d, d))
        else:
            self.fusion_logit, self.fusion_proj = None, None
        self.row_token = nn.Parameter(torch.randn(d) * d**-0.5) if cfg.row_tokens else None
        self._init_linears()

    @property
    def reducer(self) -> SpatialReducer:
        """The spatial reducer (``stab.lsd``), held under its own attribute name."""
        return getattr(self, self._reducer_name)

    def _init_linears(self) -> None:
        for module in [self.reducer, self.fsra, self.fusion_proj]:
            if module is None:
                continue
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ stages
    def _temporal(self, x: torch.Tensor, batch: int, frames: int):
        """LSTE + GSTRA + dense connection on chunks. x: (B*F, d, g, g)."""
        T = self.cfg.chunk_size
        if frames % T:
            raise ValueError(f"frames={frames} is not a multiple of stab.chunk_size={T}")
        _, d, gh, gw = x.shape
        # (B*F, d, g, g) -> (B*nc, T, d, g, g) -> (B*nc, d, T, g, g)
        volume = x.view(batch * frames // T, T, d, gh, gw).transpose(1, 2)
        feats = self.lste(volume) if self.lste is not None else volume
        video_ctx = None
        if self.gstra is not None:
            # (B*nc, d, T, g, g) -> (B*nc, T*g*g, d)
            video_ctx = self.gstra(feats.flatten(2).transpose(1, 2))
            video_ctx = video_ctx.repeat_interleave(T, dim=0)  # (B*nc, d) -> (B*F, d)
        if self.lste is not None:
            feats = feats + volume  # dense connection: LSTE(x) + x_patch
            x = feats.transpose(1, 2).reshape(batch * frames, d, gh, gw)
        return x, video_ctx

    def _fuse(self, video_ctx: torch.Tensor | None, frame_ctx: torch.Tensor | None) -> torch.Tensor | None:
        """The context token: ``proj((1 - α) ⊙ g + α ⊙ f)`` of GSTRA's video context g and FSRA's frame
        context f (either alone when the other is ablated); (n, d) or None."""
        if video_ctx is None:
            return frame_ctx
        if frame_ctx is None:
            return self.fusion_proj(video_ctx)
        alpha = torch.sigmoid(self.fusion_logit)
        return self.fusion_proj((1 - alpha) * video_ctx + alpha * frame_ctx)

    def _assemble(self, spatial: torch.Tensor, grids: list[tuple[int, int]],
                  video_ctx: torch.Tensor | None) -> tuple[torch.Tensor, np.ndarray]:
        """Every frame's token sequence from its spatial tokens: FSRA over each frame's tokens, α-fusion
        with GSTRA's video context, a row token after each row.
        spatial: (S, d) packed frame by frame, row-major -> tokens (total, d), lengths (N,) on the host."""
        rows, cols = np.asarray(grids, dtype=np.int64).reshape(-1, 2).T  # (N,), (N,)
        has_context = self.fsra is not None or video_ctx is not None
        lengths = int(has_context) + rows * (cols + int(self.row_token is not None))
        if (rows == rows[0]).all() and (cols == cols[0]).all():
            return self._stack(spatial, int(rows[0]), int(cols[0]), video_ctx), lengths
        return self._place(spatial, rows, cols, lengths, video_ctx, has_context), lengths

    def _stack(self, spatial: torch.Tensor, rows: int, cols: int, video_ctx: torch.Tensor | None) -> torch.Tensor:
        """Frames of one grid stack: (N*rows*cols, d) -> (N, rows, cols, d), sequences side by side."""
        d = spatial.shape[-1]
        x = spatial.view(-1, rows, cols, d)
        n = x.shape[0]
        frame_ctx = None
        if self.fsra is not None:
            frame_ctx = self.fsra(self.frame_query.expand(n, d), x.reshape(n, rows * cols, d))  # (n, d)
        context = self._fuse(video_ctx, frame_ctx)
        if self.row_token is not None:
            # (n, rows, cols, d) -> (n, rows, cols + 1, d): a split token after each row
            x = torch.cat([x, self.row_token.expand(n, rows, 1, d)], dim=2)
        seq = x.reshape(n, -1, d)
        if context is not None:
            seq = torch.cat([context[:, None], seq], dim=1)
        return seq.reshape(-1, d)  # frames in (b, f) order, each contiguous

    def _place(self, spatial, rows, cols, lengths, video_ctx, has_context) -> torch.Tensor:
        """Frames of several grids (aspect ratios), with a fixed number of ops: FSRA over the frames'
        tokens padded to the largest frame with a key mask, and one placement (``index_copy``). The index
        arithmetic runs on the host (the grids are there) and goes to the device in one copy."""
        device, d = spatial.device, spatial.shape[-1]
        n, count = len(rows), rows * cols  # spatial tokens per frame
        offsets = lengths.cumsum() - lengths  # where each frame's sequence begins
        frame = np.repeat(np.arange(n), count)  # frame of each spatial token
        k = np.arange(count.sum()) - np.repeat(count.cumsum() - count, count)  # its index within the frame
        first, row_width = offsets + int(has_context), cols + int(self.row_token is not None)
        dests = [first[frame] + k // cols[frame] * row_width[frame] + k % cols[frame]]
        if self.row_token is not None:  # after the last token of each row
            row_frame = np.repeat(np.arange(n), rows)
            row = np.arange(rows.sum()) - np.repeat(rows.cumsum() - rows, rows)
            dests.append(first[row_frame] + row * row_width[row_frame] + cols[row_frame])
        if has_context:
            dests.append(offsets)
        index = host_to_device(np.concatenate([frame, k, *dests]), device)  # one copy to the device
        used = len(frame)
        context = None
        if self.fsra is not None:
            longest = int(count.max())
            padded = spatial.new_zeros(n, longest, d)
            padded[index[:used], index[used:2 * used]] = spatial  # (N, Lmax, d)
            key_mask = torch.arange(longest, device=device)[None] < host_to_device(count, device)[:, None]
            context = self.fsra(self.frame_query.expand(n, d), padded, key_mask)  # (N, d)
        context = self._fuse(video_ctx, context)
        parts = [spatial]
        if self.row_token is not None:
            parts.append(self.row_token.expand(int(rows.sum()), d))
        if context is not None:
            parts.append(context)
        flat = torch.cat(parts)
        return flat.new_empty(flat.shape).index_copy(0, index[2 * used:], flat)

    def forward(self, pixels: torch.Tensor, mask: torch.Tensor, patch_valid: np.ndarray | None = None) -> VisualTokens:
        """pixels: (B, F, 3, R, R) normalised; mask: (B, F, R, R) in {0, 1}; ``patch_valid``: (B, F, g, g)
        bool on the host, the patches more than half inside the mask (``panda.data.frames.patch_validity``;
        a collator hands it over with the batch). Without it the crop boxes are read back from the device."""
        if pixels.ndim != 5:
            raise ValueError(f"pixels must be (B, F, 3, R, R), got {tuple(pixels.shape)}")
        batch, frames = pixels.shape[:2]
        x = self.patch_embed(pixels.flatten(0, 1))  # (B*F, 3, R, R) -> (B*F, d, g, g)
        valid = F.avg_pool2d(mask.flatten(0, 1)[:, None].to(x.dtype), self.cfg.patch_size)[:, 0] > 0.5  # (B*F, g, g)
        host_valid = None
        if self.reducer.crops:
            # (B, F, g, g) -> (B*F, g, g); without it: read back from the device (one wait)
            host_valid = patch_valid.reshape(valid.shape) if patch_valid is not None else valid.cpu().numpy()

        pooled = self.cfg.lsd_before_lste
        if pooled:  # ablation: the reducer on the whole canvas first, LSTE/GSTRA on the coarse grid
            x = self.reducer.downsample(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B*F, d, g/s, g/s)
            valid = F.avg_pool2d(valid[:, None].to(x.dtype), self.reducer.side)[:, 0] > 0.5
            host_valid = pool_valid(host_valid, self.reducer.side)

        video_ctx = None
        if self.temporal and (self.lste is not None or self.gstra is not None):
            x, video_ctx = self._temporal(x, batch, frames)

        grid = x.permute(0, 2, 3, 1)  # (B*F, d, g, g) -> (B*F, g, g, d)
        spatial, grids = self.reducer(grid, valid, host_valid, pooled)  # (S, d), [(rows, cols)] per frame
        tokens, lengths = self._assemble(spatial, grids, video_ctx)
        content = valid.flatten(1).any(1)  # (B*F,)
        host_content = host_valid.reshape(len(host_valid), -1).any(1) if host_valid is not None else None
        if self.cfg.compresses:  # temporal compression on the output (the switches need a cropping reducer)
            tokens, lengths = compress(tokens, lengths, grids, host_content, batch, frames, self.fsra is not None or
                                       video_ctx is not None, self.row_token is not None, self.cfg.merge_keep,
                                       self.cfg.temporal_pool)
        lengths = lengths.reshape(batch, frames)
        return VisualTokens(tokens, host_to_device(lengths, x.device), grids, content, lengths, host_content)


# The vision-to-LLM projectors (``model.projector``): each a function (STAB width, LLM width) -> module.
PROJECTORS: Registry[Callable[[int, int], nn.Module]] = Registry("projector", "model.projector",
                                                                 "panda.models.stab.PROJECTORS")


def _gelu_mlp(depth: int) -> Callable[[int, int], nn.Module]:
    def build(in_dim: int, out_dim: int) -> nn.Module:
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        return nn.Sequential(*layers)

    build.__qualname__ = f"gelu_mlp_{depth}"
    return build


PROJECTORS.register("linear")(_gelu_mlp(1))
PROJECTORS.register("mlp2x_gelu")(_gelu_mlp(2))  # the release: Linear -> GELU -> Linear
PROJECTORS.register("mlp3x_gelu")(_gelu_mlp(3))


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """The vision-to-LLM projector registered as ``kind``."""
    return PROJECTORS[kind](in_dim, out_dim)


def count_parameters(module: nn.Module | None, trainable_only: bool = False) -> int:
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
