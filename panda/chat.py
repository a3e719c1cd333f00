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

import torch

from panda import check_torchvision
from panda.data.conversation import ChatFormat, get_template, stop_token_ids, tokenize_prompt
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


def answer(model, tokenizer, video: str, question: str, frames: int, template: ChatFormat | str,
           max_new_tokens: int = 256,
           device: str = "cpu", sample_fps: float = 1.0, stream: bool = True, temperature: float = 0.0) -> str:
    stab = model.stab_cfg
    pipeline = FramePipeline(frames, stab.resolution, stab.patch_size, stab.ratio, sample_fps)
    sample = pipeline(video)  # raises VideoDecodeError naming the file
    template = get_template(template, tokenizer=tokenizer) if isinstance(template, str) else template
    ids = tokenize_prompt(tokenizer, template, question, frames)[None].to(device)
    dtype = next(model.parameters()).dtype
    kwargs = {}
    if stream:
        from transformers import TextStreamer

        kwargs["streamer"] = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature)
    out = model.generate(ids, torch.ones_like(ids), sample["pixels"][None].to(device, dtype),
                         sample["frame_mask"][None].to(device, dtype), max_new_tokens=max_new_tokens,
                         eos_token_id=stop_token_ids(template, tokenizer, model.llm), pad_token_id=tokenizer.pad_token_id, **kwargs)
    return tokenizer.decode(out[0], skip_special_tokens=True).strip()


def main(argv=None) -> int:
    check_torchvision()  # a .ckpt builds through Lightning's data module: explain a broken torchvision first
    parser = argparse.ArgumentParser(prog="python -m panda.chat", description=__doc__.split("\n\n")[0])
    parser.add_argument("question")
    parser.add_argument("--checkpoint", required=True, help="release folder, panda export folder, or train.py .ckpt")
    parser.add_argument("--video", required=True)
    parser.add_argument("--frames", type=int, default=None, help="default: the checkpoint's (8 for the release)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the release's evaluation)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    parser.add_argument("--sample-fps", type=float, default=1.0)
    parser.add_argument("--no-stream", action="store_true", help="print the answer once, at the end")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        device = check_device(args.device, args.dtype, args.attn)
        if not os.path.exists(args.video):
            raise ChatError(f"video not found: {args.video}")
        loaded = load_model(args.checkpoint, args.dtype, args.attn)
        model = loaded.model.to(device)
        frames = args.frames or loaded.frames
        chunk = model.stab_cfg.chunk_size
        if frames < 1 or frames % chunk:
            raise ChatError(f"--frames {frames}: STAB of this checkpoint groups frames in chunks of {chunk}; "
                            f"use a multiple of {chunk} (it was trained with {loaded.frames})")
        text = answer(model, loaded.tokenizer, args.video, args.question, frames, loaded.prompt_template,
                      args.max_new_tokens, device, args.sample_fps, stream=not args.no_stream, temperature=args.temperature)
    except (PandaError, NotACheckpointError, CheckpointKeyError, FileNotFoundError) as exc:
        print(f"panda.chat: error: {exc}", file=sys.stderr)
        return 2
    if args.no_stream:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
