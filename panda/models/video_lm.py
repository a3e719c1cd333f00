"""The video-language model: STAB + projector in front of any Hugging Face causal LM.

Each ``IMAGE_PLACEHOLDER_ID`` in ``input_ids`` is one frame; :func:`splice_visual_tokens`
replaces it by that frame's projected visual tokens (their count may differ per video, e.g.
16:9 vs square frames) in one vectorised scatter, with labels -100 at visual positions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from panda.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID
from panda.models.distill import DistillationHead, DistillConfig, TeacherFeatures, distillation_loss
from panda.models.host import host_to_device
from panda.models.llm_parts import llm_depth, llm_width
from panda.models.packing import pack as pack_sequences
from panda.models.stab import STAB, STABConfig, VisualTokens, build_projector, count_parameters

log = logging.getLogger(__name__)


@dataclass
class SplicedInputs:
    inputs_embeds: torch.Tensor  # (B, M, D)
    attention_mask: torch.Tensor  # (B, M) long
    labels: torch.Tensor | None  # (B, M) or None
    position_ids: torch.Tensor  # (B, M)
    visual_positions: torch.Tensor  # (total visual tokens,) index into the flattened (B*M) sequence, packed order
    # with labels: the supervised positions, known on the host (no boolean mask on the device)
    supervised: torch.Tensor | None = None  # (N,) index into the flattened (B*(M-1)) next-token positions
    supervised_targets: torch.Tensor | None = None  # (N,) the token each of them predicts
    supervised_samples: torch.Tensor | None = None  # (N,) its sample


def host_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
    """The host copies of a batch's token ids, mask and labels that the splice plans with. A collator
    hands them over with the batch (``batch["host"]``); this reads them back from the device (one
    wait) for callers that have none."""
    return {"input_ids": input_ids.cpu().numpy(), "attention_mask": attention_mask.cpu().numpy(),
            "labels": labels.cpu().numpy() if labels is not None else None}


def splice_plan(input_ids: np.ndarray, attention_mask: np.ndarray, frame_lengths: np.ndarray,
                labels: np.ndarray | None = None, padding_side: str = "right") -> dict[str, np.ndarray]:
    """Where everything goes when each frame placeholder becomes its frame's visual tokens, computed on
    the host: ``input_ids``/``attention_mask``/``labels`` (B, N); ``frame_lengths`` (B, F) visual tokens
    per frame (0: a frame a batch of mixed frame counts pads with). Index arrays (int64) named as in
    :func:`splice_visual_tokens`, plus the new mask, labels and position ids (B, M)."""
    B, N = input_ids.shape
    is_frame = input_ids == IMAGE_PLACEHOLDER_ID  # (B, N)
    present = frame_lengths > 0  # (B, F)
    per_video, frames = is_frame.sum(1), present.sum(1)
    if not np.array_equal(per_video, frames):
        raise ValueError(f"each sample needs one frame placeholder per frame ({frames.tolist()}); found {per_video.tolist()}")
    frame_len = frame_lengths[present].astype(np.int64)  # row-major = (b, f) order = the placeholders' order
    real = attention_mask.astype(bool)
    width = np.ones((B, N), dtype=np.int64)
    width[is_frame] = frame_len
    width *= real  # padding positions vanish; each row is re-padded below
    end = width.cumsum(1)
    start = end - width  # (B, N) new position of each input position
    seq_len = end[:, -1] if N else np.zeros(B, dtype=np.int64)  # (B,)
    M = int(seq_len.max()) if B else 0
    if padding_side == "left":
        start = start + (M - seq_len)[:, None]
    b_txt, n_txt = np.nonzero(real & ~is_frame)
    p_txt = start[b_txt, n_txt]
    # visual token k of frame (b, f) goes to start[b, n_f] + k
    b_frm, n_frm = np.nonzero(is_frame)  # row-major, matches visual order
    b_vis = np.repeat(b_frm, frame_len)
    within = np.arange(frame_len.sum()) - np.repeat(frame_len.cumsum() - frame_len, frame_len)
    p_vis = np.repeat(start[b_frm, n_frm], frame_len) + within
    new_mask = np.zeros((B, M), dtype=np.int64)
    new_mask[b_txt, p_txt] = 1
    new_mask[b_vis, p_vis] = 1
    plan = {"b_txt": b_txt, "n_txt": n_txt, "p_txt": p_txt, "b_vis": b_vis, "p_vis": p_vis, "attention_mask": new_mask,
            "position_ids": np.maximum(new_mask.cumsum(1) - 1, 0), "visual_positions": b_vis * M + p_vis}
    if labels is not None:
        new_labels = np.full((B, M), IGNORE_INDEX, dtype=np.int64)
        new_labels[b_txt, p_txt] = labels[b_txt, n_txt]
        target = new_labels[:, 1:]  # what each position predicts
        supervised = np.flatnonzero(target != IGNORE_INDEX)
        plan |= {"labels": new_labels, "supervised": supervised, "supervised_targets": target.reshape(-1)[supervised],
                 "supervised_samples": supervised // max(1, M - 1)}
    return plan


def splice_visual_tokens(
    text_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    visual: VisualTokens,
    labels: torch.Tensor | None = None,
    padding_side: str = "right",
    host: dict | None = None,
) -> SplicedInputs:
    """Replace each frame placeholder by its frame's visual tokens.

    text_embeds: (B, N, D) embeddings of ``input_ids`` (placeholders embedded as anything);
    input_ids/attention_mask/labels: (B, N); visual.tokens: (total, D) in (b, f) order, which is
    the order placeholders appear in the batch. ``host``: the same ids, mask and labels on the host
    (:func:`host_batch`); with them and STAB's host token counts nothing is read back from the
    device: the plan (:func:`splice_plan`) is made on the host and goes over in one copy.
    """
    B, N, D = text_embeds.shape
    device = text_embeds.device
    host = host if host is not None else host_batch(input_ids, attention_mask, labels)
    frame_lengths = visual.host_lengths if visual.host_lengths is not None else visual.lengths.cpu().numpy()
    plan = splice_plan(host["input_ids"], host["attention_mask"], frame_lengths,
                       host["labels"] if labels is not None else None, padding_side)
    M = plan["attention_mask"].shape[1]
    names = [k for k in plan if k != "labels" or labels is not None]
    sizes = [plan[k].size for k in names]
    flat = host_to_device(np.concatenate([plan[k].reshape(-1) for k in names]), device)  # one copy to the device
    on_device = {k: part.view(plan[k].shape) for k, part in zip(names, flat.split(sizes))}

    embeds = text_embeds.new_zeros(B, M, D)
    embeds[on_device["b_txt"], on_device["p_txt"]] = text_embeds[on_device["b_txt"], on_device["n_txt"]]
    embeds[on_device["b_vis"], on_device["p_vis"]] = visual.tokens.to(embeds.dtype)
    return SplicedInputs(embeds, on_device["attention_mask"], on_device.get("labels"), on_device["position_ids"],
                         on_device["visual_positions"], on_device.get("supervised"), on_device.get("supervised_targets"),
                         on_device.get("supervised_samples"))


@dataclass
class VideoLMOutput:
    loss: torch.Tensor | None  # lm_loss + weight · distill_loss
    lm_loss: torch.Tensor | None
    distill_loss: torch.Tensor | None
    logits: torch.Tensor | None  # (B, M, V) without labels; with labels only the supervised positions' (N, V)
    visual_tokens: torch.Tensor | None = None  # (B,) visual tokens per sample (what the LLM saw)
    positions: torch.Tensor | None = None  # (B,) LLM positions per sample: text + visual tokens, padding excluded
    padded_positions: int = 0  # rows x the widest row: what the LLM computed over (B x the longest sample unpacked)
    target_samples: torch.Tensor | None = None  # (N,) with labels: the sample of each row of ``logits``

    @property
    def padded_fraction_all(self) -> torch.Tensor | None:
        """The share of the LLM's positions that are padding, visual tokens included (a 0-d tensor on the
        model's device: read it on logging steps, not every batch)."""
        if self.positions is None or not self.padded_positions:
            return None
        return 1.0 - self.positions.sum().double() / self.padded_positions


def supervised_head_supported(llm: nn.Module) -> bool:
    """Whether the LM head may be applied to chosen positions only: a causal LM whose logits are
    exactly ``output_embeddings(base_model(...).last_hidden_state)`` (no logit soft-capping or
    scaling, which some families add after the head)."""
    config = llm.config
    if any(getattr(config, key, None) not in (None, 1, 1.0) for key in
           ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")):
        return False
    return hasattr(llm, getattr(llm, "base_model_prefix", "")) and llm.get_output_embeddings() is not None


class VideoLanguageModel(nn.Module):
    """STAB -> projector -> any Hugging Face causal LM (``llm``), plus the optional distillation
    head (docs/model-reference.md, "Distillation head") that is trained with STAB and read only during training."""

    def __init__(self, stab_cfg: STABConfig, llm: nn.Module, projector: str = "mlp2x_gelu",
                 distill: DistillConfig | None = None, teacher_width: int | None = None):
        super().__init__()
        self.stab_cfg = stab_cfg
        self.stab = STAB(stab_cfg)
        self.llm = llm
        self.projector_kind = projector
        self.projector = build_projector(projector, stab_cfg.width, llm_width(llm))  # any LLM width: fresh in stage 1
        self.distill_cfg = distill
        self.distill_head = None
        if distill is not None and teacher_width is not None:
            self.distill_head = DistillationHead(llm_width(llm), llm_depth(llm), teacher_width,
                                                 distill.layer_stride, distill.heads)

    def encode_video(self, pixels: torch.Tensor, mask: torch.Tensor, frame_counts=None,
                     patch_valid: np.ndarray | None = None) -> VisualTokens:
        """(B, F, 3, R, R), (B, F, R, R) -> projected per-frame tokens, packed in (b, f) order:
        for each frame its context token, then each row of LSD tokens followed by its row token.
        ``.per_frame()`` splits them into one tensor per frame.

        ``frame_counts`` (B,): videos with fewer frames than F (``data.sampling`` fps / budget) —
        each runs through STAB with its own frames only, exactly as it would alone, and the absent
        frames after them get no tokens (length 0, no grid, no content). ``frame_counts`` and
        ``patch_valid`` (see :meth:`STAB.forward`) on the host spare reading them back from the device."""
        counts = [int(c) for c in (frame_counts.tolist() if isinstance(frame_counts, torch.Tensor) else frame_counts)] \
            if frame_counts is not None else None
        if counts is None or all(c == pixels.shape[1] for c in counts):
            visual = self.stab(pixels, mask, patch_valid)
        else:
            visual = self._encode_mixed_counts(pixels, mask, counts, patch_valid)
        return VisualTokens(self.projector(visual.tokens), visual.lengths, visual.grids, visual.content, visual.host_lengths,
                            visual.host_content)

    def _encode_mixed_counts(self, pixels, mask, counts: list[int], patch_valid: np.ndarray | None) -> VisualTokens:
        B, F = pixels.shape[:2]
        device = pixels.device
        per_sample: list = [None] * B
        for count in sorted(set(counts)):  # one STAB call per distinct frame count
            idx = [b for b in range(B) if counts[b] == count]
            v = self.stab(pixels[idx, :count], mask[idx, :count], patch_valid[idx, :count] if patch_valid is not None else None)
            chunks = v.tokens.split(v.host_lengths.sum(1).tolist())
            for k, b in enumerate(idx):
                host_content = v.host_content[k * count:(k + 1) * count] if v.host_content is not None else None
                per_sample[b] = (chunks[k], v.host_lengths[k], v.grids[k * count:(k + 1) * count],
                                 v.content[k * count:(k + 1) * count], host_content)
        lengths = np.zeros((B, F), dtype=np.int64)
        content = torch.zeros(B * F, dtype=torch.bool, device=device)
        host_content = np.zeros(B * F, dtype=bool) if v.host_content is not None else None
        grids: list[tuple[int, int]] = []
        for b, (_, frame_lengths, frame_grids, frame_content, frame_host_content) in enumerate(per_sample):
            lengths[b, : counts[b]] = frame_lengths
            content[b * F: b * F + counts[b]] = frame_content
            if host_content is not None:
                host_content[b * F: b * F + counts[b]] = frame_host_content
            grids += list(frame_grids) + [(0, 0)] * (F - counts[b])
        return VisualTokens(torch.cat([t for t, *_ in per_sample]), host_to_device(lengths, device), grids, content, lengths,
                            host_content)

    def prepare_inputs(self, input_ids, attention_mask, pixels, frame_mask, labels=None, padding_side="right",
                       visual: VisualTokens | None = None, frame_counts=None, host: dict | None = None) -> SplicedInputs:
        """``host``: the batch's host copies (:func:`host_batch`; a collator's ``batch["host"]``, which may
        also hold ``patch_valid`` and ``frame_counts``): with them nothing is read back from the device."""
        host = host or {}
        if visual is None:
            visual = self.encode_video(pixels, frame_mask, host.get("frame_counts", frame_counts), host.get("patch_valid"))
        embed = self.llm.get_input_embeddings()
        text_embeds = embed(input_ids.clamp(min=0))  # placeholders embed as id 0, then get overwritten
        return splice_visual_tokens(text_embeds, input_ids, attention_mask, visual, labels, padding_side,
                                    host if "input_ids" in host else None)

    def forward(self, input_ids, attention_mask, pixels, frame_mask, labels=None, teacher: TeacherFeatures | None = None,
                frame_counts: torch.Tensor | None = None, pack: bool = False, pack_length: int | None = None,
                host: dict | None = None) -> VideoLMOutput:
        """LM cross-entropy over supervised tokens, plus the distillation loss when ``teacher``
        features are given and the model has a distillation head. ``frame_counts``: see ``encode_video``.
        ``pack``: lay the samples end to end in rows of at most ``pack_length`` positions (default the
        longest sample) with no attention between them (panda/models/packing.py): the same losses,
        less padding. ``host``: see :meth:`prepare_inputs`."""
        host = host or {}
        visual = self.encode_video(pixels, frame_mask, host.get("frame_counts", frame_counts), host.get("patch_valid"))
        spliced = self.prepare_inputs(input_ids, attention_mask, pixels, frame_mask, labels, visual=visual, host=host)
        B, M = spliced.attention_mask.shape
        positions = spliced.attention_mask.sum(1)
        sample_of = torch.arange(B, device=input_ids.device)[:, None].expand(B, M)
        llm_mask = spliced.attention_mask
        if pack:
            packed = pack_sequences(spliced.inputs_embeds, spliced.attention_mask, spliced.labels, pack_length)
            spliced = SplicedInputs(packed.inputs_embeds, packed.real, packed.labels, packed.position_ids,
                                    packed.new_index[spliced.visual_positions])
            sample_of, llm_mask = packed.sample_of, None  # no 2-D mask: the restarting position ids separate the samples
        distil = teacher is not None and self.distill_head is not None
        # only the hidden states the head reads: Hugging Face models that record hidden states by
        # hook take a list of indices and return None elsewhere; others return all, read the same way
        hidden_request = list(self.distill_head.layers) if distil else False
        target_samples = spliced.supervised_samples  # planned on the host; packed rows find theirs here
        if spliced.labels is not None and target_samples is None:
            target_samples = sample_of[:, :-1][spliced.labels[:, 1:] != IGNORE_INDEX]
        if spliced.labels is not None and supervised_head_supported(self.llm):
            out, lm_loss, logits = self.supervised_lm_loss(spliced, hidden_request, llm_mask)
        else:
            if pack:
                raise ValueError(f"data.packing needs an LLM whose LM head can run on chosen positions; "
                                 f"{type(self.llm).__name__} scales or caps its logits: set data.packing=false")
            out = self.llm(
                inputs_embeds=spliced.inputs_embeds,
                attention_mask=llm_mask,
                position_ids=spliced.position_ids,
                labels=spliced.labels,
                use_cache=False,
                output_hidden_states=hidden_request,
            )
            lm_loss, logits = out.loss, out.logits
        distill_loss, loss = None, lm_loss
        if distil:
            hidden = out.hidden_states  # L + 1 entries (B, M, D), None where not requested; index 0 = embeddings
            spatial = spliced.visual_positions[visual.spatial_index(self.stab_cfg.has_context_token, self.stab_cfg.row_tokens)]
            picked = torch.stack([hidden[j].flatten(0, 1)[spatial] for j in self.distill_head.layers], dim=1)  # (N, J, D)
            content = visual.host_content if visual.host_content is not None else visual.content.cpu().numpy()
            distill_loss = distillation_loss(self.distill_head, picked, visual.grids, content, teacher, self.distill_cfg.loss,
                                             host.get("teacher_valid"))
            loss = distill_loss * self.distill_cfg.weight if lm_loss is None else lm_loss + self.distill_cfg.weight * distill_loss
        return VideoLMOutput(loss, lm_loss, distill_loss, logits, visual.lengths.sum(1), positions,
                             spliced.attention_mask.numel(), target_samples)

    def supervised_lm_loss(self, spliced: SplicedInputs, output_hidden_states: bool | list[int],
                           attention_mask: torch.Tensor | None):
        """The LM loss with the LM head applied at the supervised positions only: the same mean
        cross-entropy as the LLM's own loss, without the (B, M, V) fp32 logits of every position
        (at 7B, micro-batch 8 and 6K positions, 12+ GiB). ``attention_mask`` None: packed rows (the
        position ids separate the samples). Returns (decoder output, loss, logits (N, V))."""
        decoder = getattr(self.llm, self.llm.base_model_prefix)
        out = decoder(inputs_embeds=spliced.inputs_embeds, attention_mask=attention_mask,
                      position_ids=spliced.position_ids, use_cache=False, output_hidden_states=output_hidden_states)
        hidden = out.last_hidden_state[:, :-1]  # (B, M-1, D): each position predicts the next token
        if spliced.supervised is not None:  # the positions, planned on the host
            picked, target = hidden.flatten(0, 1).index_select(0, spliced.supervised), spliced.supervised_targets
        else:  # packed rows: found on the device
            keep = spliced.labels[:, 1:] != IGNORE_INDEX
            picked, target = hidden[keep], spliced.labels[:, 1:][keep]
        logits = self.llm.get_output_embeddings()(picked)  # (N, D) -> (N, V)
        if logits.shape[0] == 0:  # nothing supervised: a zero that still reaches every trained weight
            return out, out.last_hidden_state.sum() * 0.0, logits
        return out, nn.functional.cross_entropy(logits.float(), target), logits

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, pixels, frame_mask, max_new_tokens: int = 32, eos_token_id=None, pad_token_id=0,
                 frame_counts=None, host: dict | None = None, **generate_kwargs):
        """Greedy generation for a batch of (video, prompt); returns only the new token ids (B, ≤max_new).
        ``host``: see :meth:`prepare_inputs`. ``generate_kwargs`` go to the LLM's ``generate`` (e.g. a ``streamer``,
        or ``do_sample=True, temperature=...`` to sample instead)."""
        spliced = self.prepare_inputs(input_ids, attention_mask, pixels, frame_mask, padding_side="left",
                                      frame_counts=frame_counts, host=host)
        settings = {"do_sample": False, "num_beams": 1, **generate_kwargs}  # greedy unless asked otherwise
        return self.llm.generate(
            inputs_embeds=spliced.inputs_embeds,
            attention_mask=spliced.attention_mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **settings,
        )

    def parameter_counts(self) -> dict[str, int]:
        return {
            "params/stab": count_parameters(self.stab),
            "params/projector": count_parameters(self.projector),
            "params/distill_head": count_parameters(self.distill_head),
            "params/llm": count_parameters(self.llm),
            "params/trainable": count_parameters(self, trainable_only=True),
            "params/total": count_parameters(self),
        }


# a built LLM's special ids when only a vocabulary size is given: LLaMA's (and the synthetic tokenizer's)
LLAMA_SPECIAL_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def special_ids(tokenizer) -> dict:
    """The BOS/EOS/pad ids a built LLM's config takes from ``tokenizer`` (a vocabulary size: LLaMA's)."""
    if isinstance(tokenizer, int):
        return dict(LLAMA_SPECIAL_IDS)
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


def build_llm(
    tokenizer,
    pretrained: str | None = None,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    intermediate_size: int = 256,
    max_position_embeddings: int = 4096,
    attn_implementation: str = "sdpa",
    dtype: str = "float32",
    initializer_range: float = 0.02,
    quantization=None,
) -> nn.Module:
    """A Hugging Face causal LM: ``from_pretrained`` of a local folder (4-bit with ``quantization``,
    a ``BitsAndBytesConfig``), or a LLaMA built from sizes (the defaults are ``LLMConfig``'s).

    ``tokenizer``: the tokenizer the LLM reads — its size is the vocabulary, and a built LLaMA's
    BOS/EOS/pad ids are its ids — or just a vocabulary size (a built LLaMA then has LLaMA's ids:
    BOS 1, EOS 2, pad 0). The pad id is the embedding's ``padding_idx``: that row starts at zero
    and gets no gradient."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    tokenizer_vocab = tokenizer if isinstance(tokenizer, int) else len(tokenizer)
    torch_dtype = getattr(torch, dtype)
    if quantization is not None and not pretrained:
        raise ValueError("llm.adapter=qlora loads a pretrained LLM in 4 bits: set llm.pretrained=FOLDER")
    if pretrained:
        extra = {"quantization_config": quantization} if quantization is not None else {}
        model = AutoModelForCausalLM.from_pretrained(pretrained, dtype=torch_dtype, attn_implementation=attn_implementation,
                                                     **extra)
        if model.get_input_embeddings().num_embeddings < tokenizer_vocab:
            model.resize_token_embeddings(tokenizer_vocab)
        return model.train()  # from_pretrained returns eval mode; callers that evaluate switch it themselves
    config = LlamaConfig(
        vocab_size=tokenizer_vocab,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        **special_ids(tokenizer),
        tie_word_embeddings=False,
        initializer_range=initializer_range,
        attn_implementation=attn_implementation,
    )
    return LlamaForCausalLM(config).to(torch_dtype)
