"""STAB, the Spatio-Temporal Alignment Block of Video-Panda (stab.md §1–5), batched.

All frames of all videos in a batch go through each stage as one tensor. The only Python loop in
:meth:`STAB.forward` runs over the distinct crop-box *shapes* in the batch (frames of one video
share one box), so the number of launched ops does not grow with frames or videos.

Stages, in the paper's terms:

- patch embedding (Conv2d, stride = patch);
- **LSTE** local spatio-temporal encoding: temporal mixer + dynamic position encoding (DPE) on
  each chunk of ``chunk_size`` frames;
- **GSTRA** global spatio-temporal relation aggregation: one learned query per chunk attends over
  all of the chunk's tokens (the video context token);
- dense connection (LSTE output + raw patch embeddings);
- per frame: crop to the valid box, **LSD** local spatial downsampling (learned attention inside
  s×s windows), **FSRA** frame-wise spatial relation aggregation (one learned query per frame),
  α-fusion of the video and frame context tokens, row (split) tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from panda.choices import Choice
from panda.registry import Registry


class LSDKind(Choice):
    """How a frame's patches become its tokens (``stab.lsd``; paper Tables 4 and 9)."""

    attention = "attention"  # LSD: learned attention in s×s windows (the release)
    avgpool = "avgpool"  # s×s average pooling
    none = "none"  # every patch is a token (pair with half the resolution, stab.ratio=1: Table 9's "w/o LSD")
    perceiver = "perceiver"  # a Perceiver Resampler: (grid/s)² learned latents per frame (Table 9's "w/o LSD (PR)")


@dataclass
class STABConfig:
    """Sizes and ablation switches of STAB. Defaults are the released Video-Panda-7B values."""

    width: int = 1024  # d
    patch_size: int = 14  # p
    heads: int = 8
    lsd_window: int = 2  # s
    chunk_size: int = 4  # T
    resolution: int = 448  # square canvas side, = ratio × teacher resolution
    ratio: int = 2  # STAB resolution / teacher resolution
    mixer_ratio: float = 1.5  # temporal mixer hidden = int(d / mixer_ratio) (682 in the release)
    dropout: float = 0.5  # GSTRA MLP and fusion projection dropout
    # ablation switches (stab.md §8); each removes computation and parameters
    use_lste: bool = True
    use_gstra: bool = True
    use_fsra: bool = True
    row_tokens: bool = True
    # how a frame's patches become its tokens (LSDKind): attention (LSD, released) | avgpool | none | perceiver
    lsd: LSDKind = LSDKind.attention
    lsd_before_lste: bool = False

    def validate(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"stab.width={self.width} must be divisible by stab.heads={self.heads}")
        LSDKind.parse(self.lsd, "stab.lsd")  # a STABConfig built in Python; a composed config failed at composition
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
        if self.lsd == "perceiver" and self.lsd_before_lste:
            raise ValueError("stab.lsd=perceiver replaces LSD; stab.lsd_before_lste has no LSD to move")
        if self.chunk_size < 1:
            raise ValueError("stab.chunk_size must be >= 1")

    @property
    def window(self) -> int:
        """The side of the patch windows one spatial token summarises: 1 with stab.lsd=none."""
        return 1 if self.lsd == "none" else self.lsd_window

    @property
    def resampled_side(self) -> int:
        """stab.lsd=perceiver: every frame's tokens form this square grid (a square frame's LSD grid); else 0."""
        return self.resolution // self.patch_size // self.lsd_window if self.lsd == "perceiver" else 0

    def spatial_grid(self, patch_rows: int, patch_cols: int) -> tuple[int, int]:
        """(rows, cols) of spatial tokens of a frame whose valid region is ``patch_rows × patch_cols`` patches."""
        if self.resampled_side:
            return self.resampled_side, self.resampled_side
        return patch_rows // self.window, patch_cols // self.window

    @property
    def has_context_token(self) -> bool:
        """A context token leads each frame when FSRA or GSTRA (which needs chunks of > 1 frame) runs."""
        return self.use_fsra or (self.chunk_size > 1 and self.use_gstra)

    def tokens_per_frame(self, rows: int, cols: int) -> int:
        """Visual tokens of a frame with ``rows × cols`` LSD tokens: context + rows, each with its row token."""
        return int(self.has_context_token) + rows * (cols + int(self.row_tokens))

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

    def spatial_index(self, context_token: bool, row_tokens: bool) -> torch.Tensor:
        """Indices into ``tokens`` of the spatial tokens (context and row tokens left out), frame by
        frame in row-major order: what the distillation head reads."""
        device = self.tokens.device
        lengths = self.lengths.flatten()
        rows, cols = torch.tensor(self.grids, device=device).unbind(1)  # (n,), (n,)
        sizes = rows * cols
        frame = torch.repeat_interleave(torch.arange(len(sizes), device=device), sizes)  # frame of each spatial token
        within = torch.arange(int(sizes.sum()), device=device) - (sizes.cumsum(0) - sizes)[frame]
        c = cols[frame]
        start = (lengths.cumsum(0) - lengths)[frame] + int(context_token)
        return start + (within // c) * (c + int(row_tokens)) + within % c

    def per_frame(self) -> list[list[torch.Tensor]]:
        """``tokens`` split into [video][frame] tensors of shape (L_frame, C)."""
        chunks = self.tokens.split(self.lengths.flatten().tolist())
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


class LocalSpatialDownsampler(nn.Module):
    """LSD: each s×s window becomes one token, ``avg + attention over the window`` (or ``avg`` alone)."""

    def __init__(self, width: int, heads: int, window: int, learned: bool = True):
        super().__init__()
        self.window = window
        self.attend = QueryAttentionPool(width, heads) if learned else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (N, h, w, d) -> (N, h/s, w/s, d)
        n, h, w, d = x.shape
        s = self.window
        if h % s or w % s:
            raise ValueError(f"LSD window {s} does not divide the {h}x{w} patch crop")
        windows = x.view(n, h // s, s, w // s, s, d).permute(0, 1, 3, 2, 4, 5).reshape(-1, s * s, d)
        return self.pool(windows).view(n, h // s, w // s, d)

    def pool(self, windows: torch.Tensor) -> torch.Tensor:
        """(W, s*s, d) windows, row-major inside each -> (W, d) tokens."""
        base = windows.mean(1)
        return base if self.attend is None else self.attend(base, windows)


class PerceiverResampler(nn.Module):
    """Table 9's alternative to LSD: ``latents`` learned queries per frame cross-attend to the frame's
    valid patches and to themselves (Flamingo's resampler, one layer: attention, then an MLP, each
    residual). Every frame gets the same number of tokens, whatever its aspect ratio."""

    def __init__(self, width: int, heads: int, latents: int):
        super().__init__()
        self.heads = heads
        self.latents = nn.Parameter(torch.randn(latents, width) * width**-0.5)
        self.norm_latents = nn.LayerNorm(width)
        self.norm_inputs = nn.LayerNorm(width)
        self.q_proj = nn.Linear(width, width, bias=False)
        self.kv_proj = nn.Linear(width, 2 * width, bias=False)
        self.out_proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, patches: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
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

    Each frame's sequence is ``[context, row_1, r, row_2, r, ..., row_h', r]`` of width ``d``.
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
        if cfg.lsd == "perceiver":
            self.lsd, self.resampler = None, PerceiverResampler(d, cfg.heads, cfg.resampled_side**2)
        else:  # "none": 1×1 windows, nothing learned — every patch is its own token
            self.lsd = LocalSpatialDownsampler(d, cfg.heads, cfg.window, learned=cfg.lsd == "attention")
            self.resampler = None
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

    def _init_linears(self) -> None:
        for module in [self.lsd.attend if self.lsd is not None else self.resampler, self.fsra, self.fusion_proj]:
            if module is None:
                continue
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)

    def tokens_per_frame(self, valid_h: int, valid_w: int, downsampled: bool = False) -> int:
        """Visual tokens of a frame whose valid region is ``valid_h × valid_w`` patches
        (of the coarse grid when LSD already ran, ``downsampled``)."""
        if downsampled:
            return self.cfg.tokens_per_frame(valid_h, valid_w)
        return self.cfg.tokens_per_frame(*self.cfg.spatial_grid(valid_h, valid_w))

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

    @staticmethod
    def _boxes(valid: torch.Tensor) -> list[tuple[int, int, int, int]]:
        """Bounding box (top, left, h, w) of valid patches per frame; empty frames -> top-left half grid."""
        n, gh, gw = valid.shape
        rows, cols = valid.any(2), valid.any(1)  # (N, gh), (N, gw)
        has = rows.any(1)
        top, left = rows.float().argmax(1), cols.float().argmax(1)
        h, w = rows.sum(1), cols.sum(1)
        fallback = torch.tensor([0, 0, gh // 2, gw // 2], device=valid.device)
        boxes = torch.stack([top, left, h, w], 1)
        boxes = torch.where(has[:, None], boxes, fallback)
        return [tuple(b) for b in boxes.tolist()]  # one host sync per batch

    def _fuse(self, video_ctx: torch.Tensor | None, frame_ctx: torch.Tensor | None) -> torch.Tensor | None:
        """The context token: ``proj((1 - α) ⊙ g + α ⊙ f)`` of GSTRA's video context g and FSRA's frame
        context f (either alone when the other is ablated); (n, d) or None."""
        if video_ctx is None:
            return frame_ctx
        if frame_ctx is None:
            return self.fusion_proj(video_ctx)
        alpha = torch.sigmoid(self.fusion_logit)
        return self.fusion_proj((1 - alpha) * video_ctx + alpha * frame_ctx)

    def _frame_tokens(self, crops: torch.Tensor, video_ctx: torch.Tensor | None, downsampled: bool) -> torch.Tensor:
        """crops: (n, h, w, d) frames of one box shape -> (n, L, d) token sequences."""
        x = crops if downsampled else self.lsd(crops)  # (n, h', w', d)
        n, hh, ww, d = x.shape
        frame_ctx = None
        if self.fsra is not None:
            frame_ctx = self.fsra(self.frame_query.expand(n, d), x.reshape(n, hh * ww, d))  # (n, d)
        context = self._fuse(video_ctx, frame_ctx)
        if self.row_token is not None:
            # (n, h', w', d) -> (n, h', w'+1, d): a split token after each row
            x = torch.cat([x, self.row_token.expand(n, hh, 1, d)], dim=2)
        seq = x.reshape(n, -1, d)
        if context is not None:
            seq = torch.cat([context[:, None], seq], dim=1)
        return seq

    def _mixed_shape_tokens(self, grid, boxes, offsets, video_ctx, downsampled):
        """Tokens of frames whose crop boxes differ in shape, with a fixed number of ops: one gather of
        every frame's LSD windows, one LSD call, FSRA over the frames' tokens padded to the largest
        frame with a key mask, and one placement. The index arithmetic runs on the host (the boxes are
        there already) and goes to the device in one copy. Returns (tokens (total, d), destinations)."""
        device, d = grid.device, grid.shape[-1]
        s = 1 if downsampled else self.cfg.window
        box = np.asarray(boxes, dtype=np.int64)  # (N, 4): top, left, h, w
        if ((box[:, 2] % s) | (box[:, 3] % s)).any():
            raise ValueError(f"LSD window {s} does not divide every patch crop: {sorted({(h, w) for _, _, h, w in boxes})}")
        top, left, hh, ww = box[:, 0], box[:, 1], box[:, 2] // s, box[:, 3] // s
        n, count = len(boxes), hh * ww  # spatial tokens per frame
        frame = np.repeat(np.arange(n), count)  # frame of each spatial token
        k = np.arange(count.sum()) - np.repeat(count.cumsum() - count, count)  # its index within the frame
        wr, wc = k // ww[frame], k % ww[frame]
        has_context = self.fsra is not None or video_ctx is not None
        first = np.asarray(offsets) + int(has_context)  # where each frame's spatial tokens begin
        row_width = ww + int(self.row_token is not None)
        dests = [first[frame] + wr * row_width[frame] + wc]
        if self.row_token is not None:
            row_frame = np.repeat(np.arange(n), hh)
            row = np.arange(hh.sum()) - np.repeat(hh.cumsum() - hh, hh)
            dests.append(first[row_frame] + row * row_width[row_frame] + ww[row_frame])
        if has_context:
            dests.append(np.asarray(offsets))
        longest = int(count.max())
        host = np.concatenate([frame, top[frame] + wr * s, left[frame] + wc * s, k, *dests])
        index = torch.from_numpy(host).to(device)  # one copy to the device
        T = len(frame)
        frame_t, r0, c0, k_t = index[:T], index[T:2 * T], index[2 * T:3 * T], index[3 * T:4 * T]
        if downsampled:
            spatial = grid[frame_t, r0, c0]  # (T, d)
        else:
            step = torch.arange(s, device=device)
            windows = grid[frame_t[:, None, None], (r0[:, None] + step)[:, :, None], (c0[:, None] + step)[:, None, :]]
            spatial = self.lsd.pool(windows.reshape(T, s * s, d))  # (T, s, s, d) windows -> (T, d)
        context = None
        if self.fsra is not None:
            padded = spatial.new_zeros(n, longest, d)
            padded[frame_t, k_t] = spatial  # (N, Lmax, d)
            key_mask = torch.arange(longest, device=device)[None] < torch.from_numpy(count).to(device)[:, None]
            context = self.fsra(self.frame_query.expand(n, d), padded, key_mask)  # (N, d)
        context = self._fuse(video_ctx, context)
        parts = [spatial]
        if self.row_token is not None:
            parts.append(self.row_token.expand(int(hh.sum()), d))
        if context is not None:
            parts.append(context)
        return torch.cat(parts), index[4 * T:]

    def forward(self, pixels: torch.Tensor, mask: torch.Tensor) -> VisualTokens:
        """pixels: (B, F, 3, R, R) normalised; mask: (B, F, R, R) in {0, 1}."""
        if pixels.ndim != 5:
            raise ValueError(f"pixels must be (B, F, 3, R, R), got {tuple(pixels.shape)}")
        batch, frames = pixels.shape[:2]
        p, s = self.cfg.patch_size, self.cfg.window
        x = self.patch_embed(pixels.flatten(0, 1))  # (B*F, 3, R, R) -> (B*F, d, g, g)
        valid = F.avg_pool2d(mask.flatten(0, 1)[:, None].to(x.dtype), p)[:, 0] > 0.5  # (B*F, g, g)

        downsampled = self.cfg.lsd_before_lste
        if downsampled:  # ablation: LSD on the full canvas first, LSTE/GSTRA on the coarse grid
            x = self.lsd(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B*F, d, g/s, g/s)
            valid = F.avg_pool2d(valid[:, None].to(x.dtype), s)[:, 0] > 0.5

        video_ctx = None
        if self.temporal and (self.lste is not None or self.gstra is not None):
            x, video_ctx = self._temporal(x, batch, frames)

        grid = x.permute(0, 2, 3, 1)  # (B*F, d, g, g) -> (B*F, g, g, d)
        content = valid.flatten(1).any(1)  # (B*F,)
        if self.resampler is not None:  # Table 9's PR: a fixed square grid of latents per frame, no crop
            n, side = grid.shape[0], self.cfg.resampled_side
            attend = valid.flatten(1) | ~content[:, None]  # a padding frame attends everywhere (no empty softmax)
            latents = self.resampler(grid.flatten(1, 2), attend)  # (B*F, g*g, d) -> (B*F, side², d)
            seq = self._frame_tokens(latents.view(n, side, side, -1), video_ctx, downsampled=True)  # (n, L, d)
            lengths = torch.full((batch, frames), seq.shape[1], device=x.device)
            return VisualTokens(seq.reshape(-1, seq.shape[-1]), lengths, [(side, side)] * n, content)
        boxes = self._boxes(valid)
        lengths = [self.tokens_per_frame(h, w, downsampled) for _, _, h, w in boxes]
        step = 1 if downsampled else s
        grids = [(h // step, w // step) for _, _, h, w in boxes]
        offsets = [0]
        for n in lengths[:-1]:
            offsets.append(offsets[-1] + n)
        shapes = {(h, w) for _, _, h, w in boxes}

        device = x.device
        if len(shapes) == 1:  # one crop shape: every frame's crop stacks as it is (fewest ops)
            (h, w), = shapes
            frame = torch.arange(len(boxes), device=device)
            tops = torch.tensor([b[0] for b in boxes], device=device)
            lefts = torch.tensor([b[1] for b in boxes], device=device)
            rows = tops[:, None] + torch.arange(h, device=device)  # (n, h)
            cols = lefts[:, None] + torch.arange(w, device=device)  # (n, w)
            crops = grid[frame[:, None, None], rows[:, :, None], cols[:, None, :]]  # (n, h, w, d)
            seq = self._frame_tokens(crops, video_ctx, downsampled)  # (n, L, d)
            starts = torch.tensor(offsets, device=device)
            dest = (starts[:, None] + torch.arange(seq.shape[1], device=device)).flatten()
            flat = seq.reshape(-1, seq.shape[-1])
        else:  # several crop shapes (aspect ratios): every frame's windows at once, not a loop per shape
            flat, dest = self._mixed_shape_tokens(grid, boxes, offsets, video_ctx, downsampled)
        tokens = flat.new_empty(flat.shape).index_copy(0, dest, flat)
        return VisualTokens(tokens, torch.tensor(lengths, device=device).view(batch, frames), grids, content)


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
