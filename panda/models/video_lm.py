"""The video-language model: STAB + projector in front of any Hugging Face causal LM.

Each ``IMAGE_PLACEHOLDER_ID`` in ``input_ids`` is one frame; :func:`splice_visual_tokens`
replaces it by that frame's projected visual tokens (their count may differ per video, e.g.
16:9 vs square frames) in one vectorised scatter, with labels -100 at visual positions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from panda.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID
from panda.models.distill import DistillationHead, DistillConfig, TeacherFeatures, distillation_loss
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


def splice_visual_tokens(
    text_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    visual: VisualTokens,
    labels: torch.Tensor | None = None,
    padding_side: str = "right",
) -> SplicedInputs:
    """Replace each frame placeholder by its frame's visual tokens.

    text_embeds: (B, N, D) embeddings of ``input_ids`` (placeholders embedded as anything);
    input_ids/attention_mask/labels: (B, N); visual.tokens: (total, D) in (b, f) order, which is
    the order placeholders appear in the batch.
    """
    B, N, D = text_embeds.shape
    device = text_embeds.device
    is_frame = input_ids == IMAGE_PLACEHOLDER_ID  # (B, N)
    per_video = is_frame.sum(1)
    present = visual.lengths > 0  # (B, F): every frame but the absent ones a batch of mixed frame counts pads with
    if not torch.equal(per_video.cpu(), present.sum(1).cpu()):
        raise ValueError(
            f"each sample needs one frame placeholder per frame ({present.sum(1).tolist()}); found {per_video.tolist()}"
        )
    frame_len = visual.lengths[present].to(device)  # row-major = (b, f) order = the placeholders' order
    real = attention_mask.bool()
    width = torch.ones_like(input_ids)
    width[is_frame] = frame_len.to(width.dtype)
    width = width * real  # padding positions vanish; each row is re-padded below
    end = width.cumsum(1)
    start = end - width  # (B, N) new position of each input position
    seq_len = end[:, -1]  # (B,)
    M = int(seq_len.max())
    shift = (M - seq_len)[:, None] if padding_side == "left" else torch.zeros_like(seq_len)[:, None]
    start = start + shift

    embeds = text_embeds.new_zeros(B, M, D)
    new_mask = torch.zeros(B, M, dtype=torch.long, device=device)
    new_labels = torch.full((B, M), IGNORE_INDEX, dtype=torch.long, device=device) if labels is not None else None

    text = real & ~is_frame
    b_txt, n_txt = text.nonzero(as_tuple=True)
    p_txt = start[b_txt, n_txt]
    embeds[b_txt, p_txt] = text_embeds[b_txt, n_txt]
    new_mask[b_txt, p_txt] = 1
    if new_labels is not None:
        new_labels[b_txt, p_txt] = labels[b_txt, n_txt]

    # visual token k of frame (b, f) goes to start[b, n_f] + k
    b_frm, n_frm = is_frame.nonzero(as_tuple=True)  # row-major, matches visual order
    b_vis = b_frm.repeat_interleave(frame_len)
    first = start[b_frm, n_frm].repeat_interleave(frame_len)
    frame_begin = (frame_len.cumsum(0) - frame_len).repeat_interleave(frame_len)
    within = torch.arange(int(frame_len.sum()), device=device) - frame_begin
    p_vis = first + within
    embeds[b_vis, p_vis] = visual.tokens.to(embeds.dtype)
    new_mask[b_vis, p_vis] = 1

    position_ids = (new_mask.cumsum(1) - 1).clamp(min=0)
    return SplicedInputs(embeds, new_mask, new_labels, position_ids, b_vis * M + p_vis)


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

    def encode_video(self, pixels: torch.Tensor, mask: torch.Tensor, frame_counts: torch.Tensor | None = None) -> VisualTokens:
        """(B, F, 3, R, R), (B, F, R, R) -> projected per-frame tokens, packed in (b, f) order:
        for each frame its context token, then each row of LSD tokens followed by its row token.
        ``.per_frame()`` splits them into one tensor per frame.

        ``frame_counts`` (B,): videos with fewer frames than F (``data.sampling`` fps / budget) —
        each runs through STAB with its own frames only, exactly as it would alone, and the absent
        frames after them get no tokens (length 0, no grid, no content)."""
        if frame_counts is None or bool((frame_counts == pixels.shape[1]).all()):
            visual = self.stab(pixels, mask)
        else:
            visual = self._encode_mixed_counts(pixels, mask, [int(c) for c in frame_counts])
        return VisualTokens(self.projector(visual.tokens), visual.lengths, visual.grids, visual.content)

    def _encode_mixed_counts(self, pixels, mask, counts: list[int]) -> VisualTokens:
        B, F = pixels.shape[:2]
        device = pixels.device
        per_sample: list = [None] * B
        for count in sorted(set(counts)):  # one STAB call per distinct frame count
            idx = [b for b in range(B) if counts[b] == count]
            v = self.stab(pixels[idx, :count], mask[idx, :count])
            chunks = v.tokens.split(v.lengths.sum(1).tolist())
            for k, b in enumerate(idx):
                per_sample[b] = (chunks[k], v.lengths[k], v.grids[k * count:(k + 1) * count], v.content[k * count:(k + 1) * count])
        lengths = torch.zeros(B, F, dtype=torch.long, device=device)
        content = torch.zeros(B * F, dtype=torch.bool, device=device)
        grids: list[tuple[int, int]] = []
        for b, (_, frame_lengths, frame_grids, frame_content) in enumerate(per_sample):
            lengths[b, : counts[b]] = frame_lengths
            content[b * F: b * F + counts[b]] = frame_content
            grids += list(frame_grids) + [(0, 0)] * (F - counts[b])
        return VisualTokens(torch.cat([t for t, *_ in per_sample]), lengths, grids, content)

    def prepare_inputs(self, input_ids, attention_mask, pixels, frame_mask, labels=None, padding_side="right",
                       visual: VisualTokens | None = None, frame_counts=None) -> SplicedInputs:
        visual = visual if visual is not None else self.encode_video(pixels, frame_mask, frame_counts)
        embed = self.llm.get_input_embeddings()
        text_embeds = embed(input_ids.clamp(min=0))  # placeholders embed as id 0, then get overwritten
        return splice_visual_tokens(text_embeds, input_ids, attention_mask, visual, labels, padding_side)

    def forward(self, input_ids, attention_mask, pixels, frame_mask, labels=None, teacher: TeacherFeatures | None = None,
                frame_counts: torch.Tensor | None = None, pack: bool = False, pack_length: int | None = None) -> VideoLMOutput:
        """LM cross-entropy over supervised tokens, plus the distillation loss when ``teacher``
        features are given and the model has a distillation head. ``frame_counts``: see ``encode_video``.
        ``pack``: lay the samples end to end in rows of at most ``pack_length`` positions (default the
        longest sample) with no attention between them (panda/models/packing.py): the same losses,
        less padding."""
        visual = self.encode_video(pixels, frame_mask, frame_counts)
        spliced = self.prepare_inputs(input_ids, attention_mask, pixels, frame_mask, labels, visual=visual)
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
        target_samples = None
        if spliced.labels is not None:
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
            distill_loss = distillation_loss(self.distill_head, picked, visual.grids, visual.content, teacher, self.distill_cfg.loss)
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
        target = spliced.labels[:, 1:]
        keep = target != IGNORE_INDEX
        logits = self.llm.get_output_embeddings()(out.last_hidden_state[:, :-1][keep])  # (N, D) -> (N, V)
        if logits.shape[0] == 0:  # nothing supervised: a zero that still reaches every trained weight
            return out, out.last_hidden_state.sum() * 0.0, logits
        return out, nn.functional.cross_entropy(logits.float(), target[keep]), logits

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, pixels, frame_mask, max_new_tokens: int = 32, eos_token_id=None, pad_token_id=0,
                 frame_counts=None, **generate_kwargs):
        """Greedy generation for a batch of (video, prompt); returns only the new token ids (B, ≤max_new).
        ``generate_kwargs`` go to the LLM's ``generate`` (e.g. a ``streamer``)."""
        spliced = self.prepare_inputs(input_ids, attention_mask, pixels, frame_mask, padding_side="left",
                                      frame_counts=frame_counts)
        return self.llm.generate(
            inputs_embeds=spliced.inputs_embeds,
            attention_mask=spliced.attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **generate_kwargs,
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
