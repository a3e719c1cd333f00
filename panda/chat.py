"""Ask a checkpoint about a video, with the answer streamed as it is generated.

    python -m panda.chat --checkpoint DIR_OR_CKPT --video FILE "What is happening?"

``--checkpoint`` is a Video-Panda release folder, a folder panda exported (``run_dir/final``), or a
``.ckpt`` written by ``train.py``. The prompt uses the evaluation template
(docs/recipe-reference.md, "Conversation templates") and
decoding is greedy unless ``--temperature`` is set.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass

import torch

from panda import check_torchvision
from panda.data.conversation import ChatFormat, get_template, stop_token_ids, tokenize_chat_prompt
from panda.data.datasets import FramePipeline
from panda.errors import PandaError
from panda.loading import load_model
from panda.models.checkpoints import CheckpointKeyError, NotACheckpointError


class ChatError(PandaError):
    """A request the chat command cannot serve; the message says what to change."""


def check_device(device: str, dtype: str, attn: str) -> str:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ChatError("--device cuda was asked for, but this machine has no CUDA GPU; use --device cpu")
    if attn == "flash_attention_2" and not device.startswith("cuda"):
        raise ChatError(
            f"--attn flash_attention_2 needs a CUDA GPU (this run is on {device}); use --attn sdpa, "
            "which works everywhere"
        )
    if attn == "flash_attention_2" and dtype not in ("bfloat16", "float16"):
        raise ChatError("flash_attention_2 runs in bfloat16 or float16; add --dtype bfloat16")
    return device


def frame_pipeline(model, frames: int, sample_fps: float = 1.0) -> FramePipeline:
    """How this model's frames are made from a video: ``frames`` of them, sampled at ``sample_fps``,
    resized and padded to STAB's resolution (the evaluation's pipeline)."""
    stab = model.stab_cfg
    return FramePipeline(frames, stab.resolution, stab.patch_size, stab.ratio, sample_fps)


def generate_answer(model, tokenizer, sample: dict, question: str, frames: int, template: ChatFormat | str,
                    history: list[tuple[str, str]] = (), max_new_tokens: int = 256, device: str = "cpu",
                    streamer=None, temperature: float = 0.0) -> str:
    """The model's answer to ``question`` about the video whose frames are ``sample`` (what
    :func:`frame_pipeline` made of it), after the earlier ``(question, answer)`` turns of
    ``history``. Greedy unless ``temperature`` > 0; ``streamer`` (a transformers streamer) receives
    the tokens as they are generated. Returns the whole answer, decoded and stripped."""
    template = get_template(template, tokenizer=tokenizer) if isinstance(template, str) else template
    ids = tokenize_chat_prompt(tokenizer, template, list(history), question, frames)[None].to(device)
    dtype = next(model.parameters()).dtype
    kwargs = {}
    if streamer is not None:
        kwargs["streamer"] = streamer
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature)
    out = model.generate(ids, torch.ones_like(ids), sample["pixels"][None].to(device, dtype),
                         sample["frame_mask"][None].to(device, dtype), max_new_tokens=max_new_tokens,
                         eos_token_id=stop_token_ids(template, tokenizer, model.llm), pad_token_id=tokenizer.pad_token_id, **kwargs)
    return tokenizer.decode(out[0], skip_special_tokens=True).strip()


def answer(model, tokenizer, video: str, question: str, frames: int, template: ChatFormat | str,
           max_new_tokens: int = 256,
           device: str = "cpu", sample_fps: float = 1.0, stream: bool = True, temperature: float = 0.0) -> str:
    """One question about one video file; with ``stream`` the answer is printed as it is generated."""
    sample = frame_pipeline(model, frames, sample_fps)(video)  # raises VideoDecodeError naming the file
    streamer = None
    if stream:
        from transformers import TextStreamer

        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    return generate_answer(model, tokenizer, sample, question, frames, template, (), max_new_tokens, device,
                           streamer, temperature)


@dataclass
class ChatModel:
    """A loaded checkpoint ready to answer: the model on its device, its tokenizer, the frames per
    video it is asked with and the prompt format it was evaluated with."""

    model: object
    tokenizer: object
    frames: int
    template: ChatFormat
    device: str
    trained_frames: int  # frames per video of its training run


def load_chat_model(checkpoint: str, frames: int | None = None, device: str = "auto", dtype: str = "float32",
                    attn: str = "sdpa") -> ChatModel:
    """Any checkpoint kind panda loads (release folder, export folder, ``train.py`` ``.ckpt``), on
    ``device``, asked with ``frames`` frames (default: the checkpoint's). Raises :class:`ChatError`
    (and the loader's own errors) with a message that says what to change."""
    device = check_device(device, dtype, attn)
    loaded = load_model(checkpoint, dtype, attn)
    model = loaded.model.to(device)
    frames = frames or loaded.frames
    chunk = model.stab_cfg.chunk_size
    if frames < 1 or frames % chunk:
        raise ChatError(f"--frames {frames}: STAB of this checkpoint groups frames in chunks of {chunk}; "
                        f"use a multiple of {chunk} (it was trained with {loaded.frames})")
    return ChatModel(model, loaded.tokenizer, frames, loaded.prompt_template, device, loaded.frames)


# what panda chat and panda demo report as a one-line error instead of a traceback
USER_ERRORS = (PandaError, NotACheckpointError, CheckpointKeyError, FileNotFoundError)


def add_answer_arguments(parser: argparse.ArgumentParser, temperature_help: str) -> None:
    """The options of how a checkpoint answers (frames, decoding, device), shared by ``panda chat`` and
    ``panda demo``."""
    parser.add_argument("--frames", type=int, default=None, help="default: the checkpoint's (8 for the release)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help=temperature_help)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    parser.add_argument("--sample-fps", type=float, default=1.0)


def main(argv=None) -> int:
    check_torchvision()  # a .ckpt builds through Lightning's data module: explain a broken torchvision first
    parser = argparse.ArgumentParser(prog="python -m panda.chat", description=__doc__.split("\n\n")[0])
    parser.add_argument("question")
    parser.add_argument("--checkpoint", required=True, help="release folder, panda export folder, or train.py .ckpt")
    parser.add_argument("--video", required=True)
    add_answer_arguments(parser, "0 = greedy (the release's evaluation)")
    parser.add_argument("--no-stream", action="store_true", help="print the answer once, at the end")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        device = check_device(args.device, args.dtype, args.attn)
        if not os.path.exists(args.video):
            raise ChatError(f"video not found: {args.video}")
        chat = load_chat_model(args.checkpoint, args.frames, device, args.dtype, args.attn)
        text = answer(chat.model, chat.tokenizer, args.video, args.question, chat.frames, chat.template,
                      args.max_new_tokens, device, args.sample_fps, stream=not args.no_stream, temperature=args.temperature)
    except USER_ERRORS as exc:
        print(f"panda.chat: error: {exc}", file=sys.stderr)
        return 2
    if args.no_stream:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
