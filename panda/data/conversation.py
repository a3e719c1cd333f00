"""Conversation templates, frame placeholders, tokenisation and label masks
(docs/recipe-reference.md, "From a record to tokens").

Two ways to turn a conversation into ids and labels, named by ``model.tokenization``:

``release`` (the default of the ``vicuna_v1`` templates)
    Exactly what the released Video-Panda weights were trained and evaluated on. The rendered
    prompt is split at each ``<image>``; each text chunk is tokenised on its own (the first with
    its BOS, later ones without), with the placeholder id between chunks. "Tokenised" means what
    transformers 4.31's slow ``LlamaTokenizer`` returned: :class:`ReleaseTextEncoder` reproduces it
    from the folder's ``tokenizer.model`` (its special-token split, its ``legacy`` handling of
    the text after ``</s>``). Labels come from the release's round arithmetic, not from character
    spans, and a sequence is cut at ``max_length`` counting each frame as one position.

``spans``
    panda's own rule for other chat formats: the text's character offsets decide which tokens are
    supervised (the answers and their end-of-turn text), an over-long conversation drops whole
    trailing turns, and ``max_length`` counts every visual token.

Two kinds of chat format, one interface (``render``, ``encode``, ``stop_token_ids``):
:class:`ConversationTemplate` (the release's Vicuna ``ROLE: text`` formats, byte-exact) and
:class:`ChatTemplateFormat` (``model.template=chat``: any other LLM, rendered by its tokenizer's
own ``chat_template``, always with the ``spans`` rule).

Either way the placeholder is never a vocabulary entry: it is spliced in as
``IMAGE_PLACEHOLDER_ID`` and replaced by the frame's visual tokens inside the model.
"""

from __future__ import annotations

import json
import os
import re
import weakref
from dataclasses import dataclass, replace
from typing import Union

import torch

from panda.choices import Choice
from panda.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID, IMAGE_TOKEN  # noqa: F401 (re-exported)
from panda.errors import SampleError


class Tokenization(Choice):
    """How a conversation becomes ids and labels (``model.tokenization``; the module docstring)."""

    release = "release"  # the released weights' ids, round-arithmetic labels, cut at max_length
    spans = "spans"  # panda's offsets-based labels; over-long conversations drop trailing turns


@dataclass(frozen=True)
class ConversationTemplate:
    name: str
    system: str
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "  # after the system text and after a user message
    sep2: str = "</s>"  # after an assistant answer
    tokenization: Tokenization = Tokenization.release  # see the module docstring

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

    def encode(self, tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character offsets of a rendered text (the ``spans`` rule): BOS when the tokenizer has one."""
        return encode_spans(tokenizer, text, bos=tokenizer.bos_token_id is not None)

    def stop_token_ids(self, tokenizer, generation_config=None) -> list[int]:
        """Tokens that end an answer: the EOS the template writes as ``sep2`` (the release stops at it)."""
        return _unique([tokenizer.eos_token_id] + _eos_ids(generation_config))


def _eos_ids(generation_config) -> list[int]:
    eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


def _unique(ids) -> list[int]:
    out: list[int] = []
    for i in ids:
        if i is not None and i not in out:
            out.append(int(i))
    return out


class NoChatFormat(ValueError):
    """A tokenizer that cannot render ``model.template=chat``; the message names the fix."""


class ChatTemplateFormat:
    """The chat format of an LLM's own tokenizer (its Jinja ``chat_template``), for LLMs other
    than the release's Vicuna: Qwen2/2.5/3, LLaMA-3.x, Mistral, ...

    - ``render`` asks the template for the conversation with every message replaced by a unique
      marker, then puts the messages back: so the character span of each answer is known exactly
      whatever the template adds around it (system prompts, headers, reasoning blocks).
    - The supervised span of an answer runs from its first character through the template's
      **turn-end token** — the first special token the template writes after an assistant message
      (``<|im_end|>``, ``<|eot_id|>``, ``</s>``), found once by rendering a probe conversation — so
      the model learns to stop; the text the template writes after it (a newline) is not supervised.
    - The frames (``<image>`` placeholders) stay where the record puts ``<video>``: at the start of
      the first user message, before its text, as the release places them.
    - BOS is added only when the template's text does not begin with it and the tokenizer adds one
      when it encodes (Qwen has none; LLaMA-3 and Mistral templates write their own).
    - ``stop_token_ids``: the turn-end token, the tokenizer's EOS and the LLM's
      ``generation_config.eos_token_id`` (all of them end generation).
    """

    name = "chat"
    tokenization = Tokenization.spans
    _MARK = re.compile("\x02([QA])(\\d+)\x03")

    def __init__(self, tokenizer, system: str | None = None):
        where = getattr(tokenizer, "name_or_path", "?") or "?"
        if not getattr(tokenizer, "chat_template", None):
            raise NoChatFormat(
                f"model.template=chat: the tokenizer in {where} has no chat_template (tokenizer_config.json / "
                f"chat_template.jinja), so panda cannot tell how this LLM formats a conversation; add the model's "
                f"chat template to that folder, or use one of panda's formats: model.template=vicuna_v1")
        if not getattr(tokenizer, "is_fast", False):
            raise NoChatFormat(f"model.template=chat needs a fast tokenizer (its offsets decide the label mask); "
                               f"{where} loaded a slow one: add its tokenizer.json")
        self.tokenizer, self.system, self.where = tokenizer, system, where
        self.turn_end_id, self.turn_end = self._find_turn_end()
        bos = tokenizer.bos_token  # does encoding add it? asked once here, not per sample in encode()
        self._adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]

    def __repr__(self) -> str:
        return f"ChatTemplateFormat({self.where!r}, turn_end={self.turn_end!r})"

    def _apply(self, messages: list[dict], generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as exc:  # jinja's TemplateError, or raise_exception() inside the template
            raise ValueError(f"the chat template of {self.where} refused the conversation: {exc}") from exc

    def _find_turn_end(self) -> tuple[int, str]:
        text = self._apply([{"role": "user", "content": "\x02Q0\x03"}, {"role": "assistant", "content": "\x02A0\x03"}],
                           generation_prompt=False)
        after = text.split("\x02A0\x03", 1)[1] if "\x02A0\x03" in text else ""
        special = set(self.tokenizer.all_special_ids) | {
            i for i, t in getattr(self.tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
        for token_id in self.tokenizer(after, add_special_tokens=False)["input_ids"]:
            if token_id in special:
                return token_id, self.tokenizer.convert_ids_to_tokens(token_id)
        raise NoChatFormat(
            f"the chat template of {self.where} writes no special token after an assistant message ({after!r}), so "
            f"panda cannot tell where an answer ends (nothing to supervise as the stop, nothing to stop generation at); "
            f"use a template that closes each turn with an end-of-turn token")

    def render(self, turns: list[tuple[str, str | None]]) -> tuple[str, list[tuple[int, int]]]:
        """Text of the conversation and the character spans to supervise (each answer through its
        turn-end token). A final turn with answer ``None`` renders the generation prompt."""
        messages = [{"role": "system", "content": self.system}] if self.system else []
        contents = {}
        for k, (question, answer) in enumerate(turns):
            messages.append({"role": "user", "content": f"\x02Q{k}\x03"})
            contents[("Q", k)] = question
            if answer is None:
                break
            messages.append({"role": "assistant", "content": f"\x02A{k}\x03"})
            contents[("A", k)] = answer
        generation_prompt = turns[-1][1] is None
        parts = self._MARK.split(self._apply(messages, generation_prompt))
        found = [(parts[i], int(parts[i + 1])) for i in range(1, len(parts), 3)]
        if sorted(found) != sorted(contents) or len(found) != len(set(found)):
            raise ValueError(f"the chat template of {self.where} did not write each message once "
                             f"(wrote {len(found)} of {len(contents)}); it cannot be used for training")
        text, spans = parts[0], []
        for i in range(1, len(parts), 3):
            kind, k, after = parts[i], int(parts[i + 1]), parts[i + 2]
            start = len(text)
            text += contents[(kind, k)]
            if kind == "A":
                cut = after.find(self.turn_end)
                if cut < 0:
                    raise ValueError(f"the chat template of {self.where} wrote no {self.turn_end!r} after answer {k}")
                spans.append((start, len(text) + cut + len(self.turn_end)))
            text += after
        return text, spans

    def encode(self, tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        return encode_spans(tokenizer, text, bos=self._adds_bos and not text.startswith(tokenizer.bos_token))

    def stop_token_ids(self, tokenizer, generation_config=None) -> list[int]:
        return _unique([self.turn_end_id, tokenizer.eos_token_id] + _eos_ids(generation_config))


ChatFormat = Union[ConversationTemplate, ChatTemplateFormat]  # what every caller takes: render / encode / stop_token_ids


def stop_token_ids(template, tokenizer, llm=None) -> list[int] | int:
    """What ends generation for ``template`` (one id stays an int: the release's own call)."""
    ids = template.stop_token_ids(tokenizer, getattr(llm, "generation_config", None))
    return ids[0] if len(ids) == 1 else ids


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


CHAT = "chat"  # model.template=chat: the tokenizer's own chat_template (ChatTemplateFormat)


def get_template(name: str, tokenization: str | None = None, tokenizer=None):
    """The named format: one of :data:`TEMPLATES` (``tokenization`` ``release``/``spans`` overrides
    its default rule), or ``chat``: the ``tokenizer``'s own chat template (always ``spans``)."""
    if name == CHAT:
        if tokenizer is None:
            raise ValueError("model.template=chat renders with the LLM's tokenizer; pass tokenizer=")
        if tokenization not in (None, "spans"):
            raise ValueError(f"model.template=chat supervises by character spans; model.tokenization={tokenization} "
                             f"is the release's Vicuna rule: set model.tokenization=spans")
        return ChatTemplateFormat(tokenizer)
    if name not in TEMPLATES:
        raise ValueError(f"unknown conversation template {name!r}; choose one of {sorted(TEMPLATES) + [CHAT]}")
    if tokenization is None:
        return TEMPLATES[name]
    return replace(TEMPLATES[name], tokenization=Tokenization.parse(tokenization, "model.tokenization"))


def expand_video_token(text: str, frames: int) -> str:
    """``<video>`` -> ``frames`` image placeholders (one per frame)."""
    return text.replace("<video>", IMAGE_TOKEN * frames)


# --------------------------------------------------------------------------- release tokenisation

SPIECE_UNDERLINE = "\u2581"


class ReleaseTextEncoder:
    """``tokenizer(text).input_ids`` as the release computed it (BOS first).

    With a SentencePiece ``tokenizer.model`` beside the tokenizer (Vicuna, LLaMA, EVE), this
    follows transformers 4.31's slow ``LlamaTokenizer``: the text is split at the special tokens
    (``<s>``, ``</s>``, ``<unk>``); with ``legacy: false`` (Vicuna v1.5's tokenizer_config) a
    ``▁`` is put in front of the whole text, the first piece keeps SentencePiece's dummy prefix and
    every later piece (the text right after a ``</s>``) loses it — a first token whose unprefixed
    form is not in the vocabulary becomes ``<unk>``; with ``legacy: true`` (4.31's default when the
    key is absent) every piece is encoded on its own with its dummy prefix. Pieces the model does
    not know map to ``<unk>``.

    Without a ``tokenizer.model`` (panda's synthetic BPE, other fast tokenizers) the text is split
    at the special tokens the same way and each piece is encoded on its own by the fast tokenizer
    (like 4.31's ``legacy: true``), so a round tokenised alone counts what it counts in the prompt.
    """

    def __init__(self, tokenizer):
        if tokenizer.bos_token_id is None:
            raise ValueError(
                f"model.tokenization=release needs a tokenizer with a BOS token (the release's label arithmetic "
                f"counts it); {getattr(tokenizer, 'name_or_path', '?')} has none: set model.tokenization=spans")
        self.bos_id = tokenizer.bos_token_id
        self.sp_path = sentencepiece_file(tokenizer)
        self._tokenizer = None if self.sp_path else tokenizer
        self._sp = None
        self.legacy = True
        if self.sp_path:
            self.legacy = bool(read_tokenizer_config(os.path.dirname(self.sp_path)).get("legacy", True))
        specials = [t for t in (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) if t]
        specials += [t for t in getattr(tokenizer, "additional_special_tokens", []) or [] if t != IMAGE_TOKEN]
        self.special_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in sorted(self.special_ids, key=len, reverse=True)) + ")")

    @property
    def sp(self):
        if self._sp is None:
            import sentencepiece

            self._sp = sentencepiece.SentencePieceProcessor(model_file=self.sp_path)
        return self._sp

    def __getstate__(self):  # picklable for DataLoader workers that spawn
        state = dict(self.__dict__)
        state["_sp"] = None
        return state

    def __call__(self, text: str) -> list[int]:
        if self._tokenizer is not None:
            ids = [self.bos_id]
            for segment in self._split.split(text):
                if segment in self.special_ids:
                    ids.append(self.special_ids[segment])
                elif segment:
                    ids += self._tokenizer(segment, add_special_tokens=False)["input_ids"]
            return ids
        return [self.bos_id] + [self.special_ids[p] if p in self.special_ids else self.sp.piece_to_id(p)
                                for p in self.pieces(text)]

    def pieces(self, text: str) -> list[str]:
        """SentencePiece pieces (special tokens as themselves), as 4.31's ``tokenize`` gives them."""
        if not self.legacy:
            text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
        out: list[str] = []
        for segment in self._split.split(text):
            if not segment:
                continue
            if segment in self.special_ids:
                out.append(segment)
                continue
            if self.legacy:
                out += self.sp.encode(segment, out_type=str)
                continue
            first = segment.startswith(SPIECE_UNDERLINE)
            if first:
                segment = segment[1:]
            pieces = self.sp.encode(segment, out_type=str)
            if not first and not segment.startswith(" ") and pieces and pieces[0].startswith(SPIECE_UNDERLINE):
                pieces = ([pieces[0][1:]] if len(pieces[0]) > 1 else []) + pieces[1:]
            out += pieces
        return out


def sentencepiece_file(tokenizer) -> str | None:
    """The tokenizer's SentencePiece model file, if it has one."""
    candidates = [getattr(tokenizer, "vocab_file", None)]
    folder = getattr(tokenizer, "name_or_path", None)
    if folder and os.path.isdir(folder):
        candidates.append(os.path.join(folder, "tokenizer.model"))
    for path in candidates:
        if isinstance(path, str) and path.endswith(".model") and os.path.isfile(path):
            return os.path.abspath(path)
    return None


def read_tokenizer_config(folder: str) -> dict:
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


_ENCODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def release_encoder(tokenizer) -> ReleaseTextEncoder:
    """One :class:`ReleaseTextEncoder` per tokenizer object (built on first use)."""
    try:
        return _ENCODERS[tokenizer]
    except KeyError:
        encoder = _ENCODERS[tokenizer] = ReleaseTextEncoder(tokenizer)
        return encoder


def encode_with_placeholders(encode, text: str) -> list[int]:
    """The release's prompt tokenisation: split at ``<image>``, encode each chunk (BOS kept on the
    first, dropped on the others) and put ``IMAGE_PLACEHOLDER_ID`` between the chunks."""
    chunks = text.split(IMAGE_TOKEN)
    ids = encode(chunks[0])
    for chunk in chunks[1:]:
        ids += [IMAGE_PLACEHOLDER_ID] + encode(chunk)[1:]
    return ids


def release_labels(encode, template: ConversationTemplate, text: str, ids: list[int]) -> tuple[list[int], int]:
    """Labels by the release's round arithmetic; returns ``(labels, cur_len)``.

    The prompt is split into rounds at ``sep2``; each round supervises its tokens after
    ``instruction_len`` = tokens of the round through ``"ASSISTANT: "`` (with BOS) minus 2, and
    ``cur_len`` advances by the round's own token count (with BOS, which stands in for the
    ``</s>`` the split removed). Everything after the last round is masked.
    """
    labels = list(ids)
    cur_len = 1
    labels[:cur_len] = [IGNORE_INDEX] * cur_len
    sep = template.sep + template.roles[1] + ": "
    for rnd in text.split(template.sep2):
        if rnd == "":
            break
        parts = rnd.split(sep)
        if len(parts) != 2:
            break
        round_len = len(encode_with_placeholders(encode, rnd))
        instruction_len = len(encode_with_placeholders(encode, parts[0] + sep)) - 2
        end = min(cur_len + instruction_len, len(labels))
        labels[cur_len:end] = [IGNORE_INDEX] * max(0, end - cur_len)
        cur_len += round_len
    labels[cur_len:] = [IGNORE_INDEX] * max(0, len(labels) - cur_len)
    return labels, cur_len


# --------------------------------------------------------------------------- spans tokenisation

def encode_spans(tokenizer, text: str, bos: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and character offsets of ``text``: BOS (with ``bos``), then each ``<image>``-separated
    chunk encoded on its own with ``IMAGE_PLACEHOLDER_ID`` between chunks (placeholders and BOS get
    empty offsets); special tokens written in the text (``<|im_start|>``) become their ids."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("model.tokenization=spans needs a fast tokenizer (its offsets decide the label mask)")
    ids = [tokenizer.bos_token_id] if bos and tokenizer.bos_token_id is not None else []
    offsets = [(0, 0)] * len(ids)
    start = 0
    for k, chunk in enumerate(text.split(IMAGE_TOKEN)):
        if k:
            ids.append(IMAGE_PLACEHOLDER_ID)
            offsets.append((start, start))
            start += len(IMAGE_TOKEN)
        if chunk:
            enc = tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True)
            ids += list(enc["input_ids"])
            offsets += [(start + a, start + b) for a, b in enc["offset_mapping"]]
        start += len(chunk)
    return ids, offsets


def span_labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    labels = [IGNORE_INDEX] * len(ids)
    span_idx = 0
    for i, (start, end) in enumerate(offsets):
        if end <= start:
            continue
        while span_idx < len(spans) and spans[span_idx][1] <= start:
            span_idx += 1
        if span_idx < len(spans) and start < spans[span_idx][1] and end > spans[span_idx][0]:
            labels[i] = ids[i]
    return labels


# --------------------------------------------------------------------------- conversations and prompts

@dataclass
class TokenizedConversation:
    input_ids: torch.Tensor  # (N,) with IMAGE_PLACEHOLDER_ID at frame positions
    labels: torch.Tensor  # (N,) IGNORE_INDEX except answer tokens
    dropped_turns: int = 0  # spans: trailing turns dropped to fit max_length
    cut_tokens: int = 0  # release: positions cut at max_length


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
    """Tokens and labels of a conversation whose first question holds ``<video>``, by the
    template's ``tokenization`` rule (module docstring).

    ``release``: ``max_length`` bounds the text positions, each frame counting as one (the
    release's collator cut); the tail past it is cut, a partly cut answer stays supervised.
    ``spans``: ``max_length`` bounds the sequence *after* each placeholder becomes
    ``visual_tokens_per_frame`` tokens; trailing turns are dropped until it fits.

    A conversation that cannot be trained on (tokenisation mismatch, too long, nothing left to
    supervise, placeholders cut) raises :class:`SampleError` naming the record and video.
    """
    if template.tokenization == "release":
        return _tokenize_release(tokenizer, template, turns, frames, max_length, record_id, video)
    return _tokenize_spans(tokenizer, template, turns, frames, max_length, visual_tokens_per_frame, record_id, video)


def _tokenize_release(tokenizer, template, turns, frames, max_length, record_id, video) -> TokenizedConversation:
    encode = release_encoder(tokenizer)
    text, _ = template.render([(expand_video_token(q, frames), a) for q, a in turns])
    ids = encode_with_placeholders(encode, text)
    labels, cur_len = release_labels(encode, template, text, ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
    total_len = sum(1 for t in ids if t != pad)
    if cur_len < max_length and cur_len != total_len:
        # the release trains such a sample with every label masked; panda counts and skips it
        unknown = sum(1 for t in ids if t == pad)
        why = (f"{unknown} token(s) of the text are {tokenizer.convert_ids_to_tokens(pad)}, which the release counts as "
               f"padding: the tokenizer cannot read part of this text (check llm.tokenizer / llm.pretrained)"
               if unknown else f"an answer holds '{template.sep2}' or '{template.sep}{template.roles[1]}: '")
        raise SampleError(record_id, video, f"tokenization mismatch: the rounds count {cur_len} tokens, the prompt has "
                          f"{total_len} non-pad tokens; {why}")
    cut = max(0, len(ids) - max_length)
    ids, labels = ids[:max_length], labels[:max_length]
    n_img = ids.count(IMAGE_PLACEHOLDER_ID)
    if n_img != frames:
        why = f"cut at max_length={max_length}" if cut and n_img < frames else "in the conversation"
        raise SampleError(record_id, video, f"expected {frames} frame placeholders, found {n_img} ({why})")
    if all(label == IGNORE_INDEX for label in labels):
        why = f" (cut at max_length={max_length})" if cut else ""
        raise SampleError(record_id, video, f"no supervised token after tokenisation{why}")
    return TokenizedConversation(torch.tensor(ids), torch.tensor(labels), 0, cut)


def _tokenize_spans(tokenizer, template, turns, frames, max_length, visual_tokens_per_frame, record_id,
                    video) -> TokenizedConversation:
    for keep in range(len(turns), 0, -1):
        try:
            text, spans = template.render([(expand_video_token(q, frames), a) for q, a in turns[:keep]])
        except ValueError as exc:
            raise SampleError(record_id, video, str(exc)) from exc
        ids, offsets = template.encode(tokenizer, text)
        n_img = ids.count(IMAGE_PLACEHOLDER_ID)
        length = len(ids) + n_img * (visual_tokens_per_frame - 1)
        if length <= max_length:
            break
    else:
        raise SampleError(record_id, video, f"too long: first turn needs {length} tokens > max_length={max_length}", code="too_long")
    labels = span_labels(ids, offsets, spans)
    if all(label == IGNORE_INDEX for label in labels):
        raise SampleError(record_id, video, "no supervised token after tokenisation")
    if n_img != frames:
        raise SampleError(record_id, video, f"expected {frames} frame placeholders, found {n_img}")
    return TokenizedConversation(torch.tensor(ids), torch.tensor(labels), len(turns) - keep)


def tokenize_prompt(tokenizer, template: ConversationTemplate, question: str, frames: int) -> torch.Tensor:
    """Generation prompt for one question about a video (the release's evaluation prompt:
    ``<image>`` × frames, a newline, the question), ending with ``ASSISTANT:``."""
    return tokenize_chat_prompt(tokenizer, template, [], question, frames)


def tokenize_chat_prompt(tokenizer, template: ChatFormat, history: list[tuple[str, str]], question: str,
                         frames: int) -> torch.Tensor:
    """Generation prompt for the next question of a conversation about one video: the earlier
    ``(question, answer)`` turns of ``history``, then ``question``, ending where the answer starts
    (``ASSISTANT:``, or the chat template's generation prompt).

    The conversation is rendered and tokenised as training renders a multi-turn record (each
    earlier answer closed by the template's end of turn), so the prompt is the training ids up to
    the answer being asked for. The frames go where the first question says ``<video>``, else
    before its text (the release's evaluation prompt: ``<image>`` × frames, a newline, the
    question); a ``<video>`` in a later question stays text.
    """
    turns = [*history, (question, None)]
    first = turns[0][0] if "<video>" in turns[0][0] else f"<video>\n{turns[0][0]}"
    turns[0] = (expand_video_token(first, frames), turns[0][1])  # the frames once, in the first question
    text, _ = template.render(turns)
    if template.tokenization == "release":
        ids = encode_with_placeholders(release_encoder(tokenizer), text)
    else:
        ids, _ = template.encode(tokenizer, text)
    return torch.tensor(ids)
