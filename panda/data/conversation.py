"""Conversation templates, placeholder expansion, tokenisation and label masks (training.md §2).

The text is rendered once; the tokenizer's character offsets decide which tokens are supervised
(the assistant answers and their ``</s>``). This works the same for any fast tokenizer, instead of
re-tokenising pieces and patching lengths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from panda.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID, IMAGE_TOKEN  # noqa: F401 (re-exported)
from panda.errors import SampleError


@dataclass(frozen=True)
class ConversationTemplate:
    name: str
    system: str
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "  # after the system text and after a user message
    sep2: str = "</s>"  # after an assistant answer

    def render(self, turns: list[tuple[str, str | None]]) -> tuple[str, list[tuple[int, int]]]:
        """Text of the conversation and the character spans to supervise (answers + ``sep2``).

        A final turn with answer ``None`` renders a generation prompt ending in ``ASSISTANT:``.
        """
        text = self.system + self.sep
        spans = []
        for question, answer in turns:
            text += f"{self.roles[0]}: {question}{self.sep}{self.roles[1]}:"
            if answer is None:
                break
            text += " "
            start = len(text)
            text += answer + self.sep2
            spans.append((start, len(text)))
        return text, spans


_VICUNA_SYSTEM = (
    "A chat between a curious {who} and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the {who}'s questions."
)

TEMPLATES = {
    # used for training by the release
    "vicuna_v1": ConversationTemplate("vicuna_v1", _VICUNA_SYSTEM.format(who="user")),
    # the release's evaluation variant ("curious human ... the human's questions")
    "vicuna_v1_eval": ConversationTemplate("vicuna_v1_eval", _VICUNA_SYSTEM.format(who="human")),
}


def get_template(name: str) -> ConversationTemplate:
    if name not in TEMPLATES:
        raise ValueError(f"unknown conversation template {name!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def expand_video_token(text: str, frames: int) -> str:
    """``<video>`` -> ``frames`` image placeholders (one per frame)."""
    return text.replace("<video>", IMAGE_TOKEN * frames)


def _encode(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = [tokenizer.bos_token_id] + list(enc["input_ids"])
    offsets = [(0, 0)] + [tuple(o) for o in enc["offset_mapping"]]
    return ids, offsets


def image_token_id(tokenizer) -> int:
    tid = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if tid is None or tid == tokenizer.unk_token_id:
        raise ValueError(
            f"the tokenizer has no {IMAGE_TOKEN!r} token; load it with panda.data.tokenizer.load_tokenizer"
        )
    return tid


@dataclass
class TokenizedConversation:
    input_ids: torch.Tensor  # (N,) with IMAGE_PLACEHOLDER_ID at frame positions
    labels: torch.Tensor  # (N,) IGNORE_INDEX except answer tokens
    dropped_turns: int = 0


def tokenize_conversation(
    tokenizer,
    template: ConversationTemplate,
    turns: list[tuple[str, str]],
    frames: int,
    max_length: int,
    visual_tokens_per_frame: int = 1,
    record_id: str = "?",
    video: str = "?",
) -> TokenizedConversation:
    """Tokens and labels of a conversation whose first question holds ``<video>``.

    ``max_length`` bounds the sequence *after* each placeholder becomes
    ``visual_tokens_per_frame`` tokens. An over-long conversation loses trailing turns until it
    fits; if even the first turn does not fit, or nothing is left to supervise, a
    :class:`SampleError` says so.
    """
    img_id = image_token_id(tokenizer)
    for keep in range(len(turns), 0, -1):
        text, spans = template.render([(expand_video_token(q, frames), a) for q, a in turns[:keep]])
        ids, offsets = _encode(tokenizer, text)
        length = len(ids) + sum(1 for t in ids if t == img_id) * (visual_tokens_per_frame - 1)
        if length <= max_length:
            break
    else:
        raise SampleError(record_id, video, f"too long: first turn needs {length} tokens > max_length={max_length}")
    labels = [IGNORE_INDEX] * len(ids)
    span_idx = 0
    for i, (start, end) in enumerate(offsets):
        if end <= start:
            continue
        while span_idx < len(spans) and spans[span_idx][1] <= start:
            span_idx += 1
        if span_idx < len(spans) and start < spans[span_idx][1] and end > spans[span_idx][0]:
            labels[i] = ids[i]
    if all(label == IGNORE_INDEX for label in labels):
        raise SampleError(record_id, video, "no supervised token after tokenisation")
    n_img = sum(1 for t in ids if t == img_id)
    if n_img != frames:
        raise SampleError(record_id, video, f"expected {frames} frame placeholders, found {n_img}")
    input_ids = torch.tensor([IMAGE_PLACEHOLDER_ID if t == img_id else t for t in ids])
    return TokenizedConversation(input_ids, torch.tensor(labels), len(turns) - keep)


def tokenize_prompt(tokenizer, template: ConversationTemplate, question: str, frames: int) -> torch.Tensor:
    """Generation prompt for one question about a video: ends with ``ASSISTANT:``."""
    img_id = image_token_id(tokenizer)
    q = question if "<video>" in question else f"<video>\n{question}"
    text, _ = template.render([(expand_video_token(q, frames), None)])
    ids, _ = _encode(tokenizer, text)
    return torch.tensor([IMAGE_PLACEHOLDER_ID if t == img_id else t for t in ids])
