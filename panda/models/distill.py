"""The distillation head of Video-Panda (docs/model-reference.md, "Distillation head"): LLM
hidden states at the visual positions are mapped into the teacher's feature space and pulled
towards the teacher's patch features.

Per spatial visual token (context and row tokens removed):

- pick the LLM hidden states of layers ``L, L-s, L-2s, …, 0`` (s = ``layer_stride``, 4 in the
  release: 9 layers of a 32-layer LLM, counted over all ``L + 1`` hidden states, embeddings = 0);
- ``n_j = Linear_j(LN_j(h_j))`` (D → t, no bias) for each picked layer j;
- fuse: the query is ``n`` of layer L, keys = values = the other picked layers; per head (no
  projections) ``w = softmax(q·k · t^-0.5)`` over those layers, ``fused = Σ w·k``;
- ``pred = Linear_in(h_L) + Linear_out(fused)``.

The loss per frame is ``1 − mean cos(pred, teacher)`` (``cosine``, the release) or the mean
squared error (``mse``), averaged over frames that show content. When the STAB token grid and the
teacher's patch grid differ, the finer one is average-pooled to the coarser.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from panda.choices import Choice
from panda.models.stab import crop_boxes


class DistillLoss(Choice):
    """``distill.loss``: how a prediction is compared with the teacher's features."""

    cosine = "cosine"  # the release
    mse = "mse"
    off = "off"


@dataclass
class DistillConfig:
    """Distillation switches (docs/model-reference.md, "Distillation head"). ``loss=off`` or
    ``teacher=none`` turns it off."""

    loss: DistillLoss = DistillLoss.cosine
    weight: float = 1.0  # added to the LM loss with this weight (1 in the release)
    layer_stride: int = 4  # picks LLM layers L, L-s, …, 0
    heads: int = 8  # heads of the layer-fusion attention (no projections)


def picked_layers(num_layers: int, stride: int) -> list[int]:
    """Hidden-state indices ``L, L-s, …`` down to 0 (index 0 = the embeddings)."""
    return list(range(num_layers, -1, -stride))


class DistillationHead(nn.Module):
    """LLM hidden states (N, J, D) of the picked layers (layer L first) -> predictions (N, t)."""

    def __init__(self, llm_width: int, llm_layers: int, teacher_width: int, layer_stride: int = 4, heads: int = 8):
        super().__init__()
        self.layers = picked_layers(llm_layers, layer_stride)
        if len(self.layers) < 2:
            raise ValueError(
                f"distill.layer_stride={layer_stride} picks only layer(s) {self.layers} of a {llm_layers}-layer LLM; "
                f"the fusion needs at least two (use distill.layer_stride <= {llm_layers})"
            )
        if teacher_width % heads:
            raise ValueError(f"teacher width {teacher_width} must be divisible by distill.heads={heads}")
        self.heads = heads
        self.teacher_width = teacher_width
        # release names: norm_layer.J.{0,1}, input_layer, output_layer (model.video_tower_compressor.*)
        self.norm_layer = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(llm_width), nn.Linear(llm_width, teacher_width, bias=False)) for _ in self.layers
        )
        self.input_layer = nn.Linear(llm_width, teacher_width)
        self.output_layer = nn.Linear(teacher_width, teacher_width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        n, J, _ = hidden.shape
        t, h = self.teacher_width, self.heads
        normed = torch.stack([norm(hidden[:, j]) for j, norm in enumerate(self.norm_layer)], dim=1)  # (N, J, t)
        query = normed[:, 0].reshape(n, h, 1, t // h)  # (N, h, 1, t/h)
        keys = normed[:, 1:].reshape(n, J - 1, h, t // h).transpose(1, 2)  # (N, J-1, t) -> (N, h, J-1, t/h)
        weights = ((query * keys).sum(-1) * t**-0.5).softmax(-1)  # (N, h, J-1)
        fused = (weights[..., None] * keys).sum(2).reshape(n, t)  # (N, h, t/h) -> (N, t)
        return self.input_layer(hidden[:, 0]) + self.output_layer(fused)


@dataclass
class TeacherFeatures:
    """A teacher's patch features for every frame of a batch, on its own square patch grid."""

    grid: torch.Tensor  # (B*F, g, g, t)
    valid: torch.Tensor  # (B*F, g, g) bool: patches inside the frame's pasted region


def valid_boxes(valid: np.ndarray) -> list[tuple[int, int, int, int] | None]:
    """(top, left, h, w) of the valid patches of each frame of ``valid`` (N, g, g) on the host (STAB's
    :func:`crop_boxes`); None for a frame with none."""
    return [tuple(box) if has else None for box, has in zip(crop_boxes(valid).tolist(), valid.any((1, 2)))]


def frame_distillation_losses(pred: torch.Tensor, teacher: torch.Tensor, loss: str) -> torch.Tensor:
    """pred (n, r, c, t), teacher (n, r', c', t) -> per-frame loss (n,), pooling the finer grid. Computed
    in fp32 whatever the inputs' dtype (bf16 under autocast or FSDP's bf16 compute), like the LM loss."""
    r, c = min(pred.shape[1], teacher.shape[1]), min(pred.shape[2], teacher.shape[2])

    def pool(x):  # (n, h, w, t) -> (n, r, c, t); plain average pooling when the ratio is an integer
        if x.shape[1:3] == (r, c):
            return x
        return F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), (r, c)).permute(0, 2, 3, 1)

    pred, teacher = pool(pred.float()).flatten(1, 2), pool(teacher.float()).flatten(1, 2)  # (n, r*c, t)
    if loss == "cosine":
        return 1 - F.cosine_similarity(pred, teacher, dim=-1).mean(1)
    if loss == "mse":
        return (pred - teacher).pow(2).mean((1, 2))
    raise ValueError(f"distill.loss={loss!r}: use one of {', '.join(DistillLoss)}")


def distillation_loss(
    head: DistillationHead,
    spatial_hidden: torch.Tensor,
    frame_grids: list[tuple[int, int]],
    content: np.ndarray,
    teacher: TeacherFeatures,
    loss: str,
    teacher_valid: np.ndarray | None = None,
) -> torch.Tensor:
    """Mean per-frame distillation loss over the frames with content.

    spatial_hidden: (sum of rows*cols over frames, J, D), the picked LLM hidden states at each
    frame's spatial visual tokens in (b, f, row, col) order; frame_grids: (rows, cols) per frame;
    content: (B*F,) bool on the host, frames that show something (padding frames of short videos do
    not); ``teacher_valid``: ``teacher.valid`` on the host (a collator's ``host["teacher_valid"]``),
    else read back from the device. Which frame pairs with which teacher region is decided on the host.
    """
    pred = head(spatial_hidden)  # (N, t)
    sizes = [r * c for r, c in frame_grids]
    per_frame = pred.split(sizes)
    groups: dict[tuple, list[int]] = {}
    boxes = {}
    host_valid = teacher_valid.reshape(teacher.valid.shape) if teacher_valid is not None else teacher.valid.cpu().numpy()
    frame_boxes = valid_boxes(host_valid)
    for i, has in enumerate(np.asarray(content).tolist()):
        box = frame_boxes[i] if has else None
        if box is None:
            continue  # nothing to distil on this frame
        boxes[i] = box
        groups.setdefault(frame_grids[i] + box[2:], []).append(i)
    if not groups:
        return pred.sum() * 0.0  # keeps the graph (every rank must run the same backward)
    losses = []
    for (r, c, _, _), idx in groups.items():
        p = torch.stack([per_frame[i].view(r, c, -1) for i in idx])  # (n, r, c, t)
        t = torch.stack([teacher.grid[i, top : top + h, left : left + w] for i in idx for top, left, h, w in [boxes[i]]])
        losses.append(frame_distillation_losses(p, t, loss))
    return torch.cat(losses).mean()
