"""The processor of an exported folder: a video (a file, its encoded bytes, or decoded frames) and a
question become the model's inputs with the checkpoint's own settings (``processor_config.json``:
frames per video, frame sampling, STAB's resolution, the evaluation template and tokenization),
through the same frame pipeline and prompt code as ``panda chat``."""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from panda.data.conversation import get_template, tokenize_prompt
from panda.data.datasets import FramePipeline
from panda.data.frames import preprocess_frames
from panda.data.tokenizer import load_tokenizer
from panda.data.video import sample_frame_indices

PROCESSOR_FILE = "processor_config.json"
# the settings a processor keeps (processor_config.json), each with what it means
SETTINGS = {
    "frames": "frames per video (the checkpoint's)",
    "sample_fps": "candidate frames per second of video before the frames are picked evenly among them",
    "resolution": "STAB's square canvas side in pixels",
    "patch_size": "STAB's patch side in pixels",
    "ratio": "STAB resolution / teacher resolution (the frame layout on the canvas)",
    "template": "the evaluation conversation template (a name, or chat: the tokenizer's own)",
    "tokenization": "how prompts become ids (release: the Vicuna rule; spans: the tokenizer as is)",
}


class PandaVideoProcessor:
    """``processor(video=..., text=...)`` -> ``input_ids``, ``attention_mask`` (1, N), ``pixel_values``
    (1, F, 3, R, R) and ``frame_mask`` (1, F, R, R), ready for ``model.generate(**inputs)``.

    ``video``: a file path, a video's encoded bytes, or its decoded frames as a (T, H, W, 3) uint8
    array (then ``video_fps`` says their rate; default: each one a candidate frame)."""

    def __init__(self, tokenizer, frames: int, resolution: int, patch_size: int, ratio: int = 2, sample_fps: float = 1.0,
                 template: str = "vicuna_v1", tokenization: str = "release"):
        self.tokenizer = tokenizer
        self.frames, self.resolution, self.patch_size, self.ratio = frames, resolution, patch_size, ratio
        self.sample_fps, self.template_name, self.tokenization = sample_fps, template, tokenization
        self.template = get_template(template, tokenization, tokenizer)
        self.pipeline = FramePipeline(frames, resolution, patch_size, ratio, sample_fps)

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoProcessor") -> None:
        """What ``AutoProcessor`` calls on a class from a folder's code; the folder's ``auto_map`` already names it."""
        cls._auto_class = auto_class

    @classmethod
    def from_pretrained(cls, folder, **kwargs) -> "PandaVideoProcessor":
        """The processor of an exported folder (its ``processor_config.json`` and tokenizer)."""
        folder = os.fspath(folder)
        with open(os.path.join(folder, PROCESSOR_FILE), encoding="utf-8") as f:
            settings = json.load(f)
        # the folder's config.json names its own code: the caller trusted it to come this far
        return cls(load_tokenizer(folder, trust_remote_code=True), **{key: settings[key] for key in SETTINGS})

    def settings(self) -> dict:
        return {"frames": self.frames, "sample_fps": self.sample_fps, "resolution": self.resolution,
                "patch_size": self.patch_size, "ratio": self.ratio, "template": self.template_name,
                "tokenization": self.tokenization}

    def save_pretrained(self, folder: str) -> None:
        """Write ``processor_config.json`` (with the class the folder's ``auto_map`` names) and the tokenizer."""
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, PROCESSOR_FILE), "w", encoding="utf-8") as f:
            json.dump({"processor_class": type(self).__name__,
                       "auto_map": {"AutoProcessor": "processing_panda.PandaVideoProcessor"},
                       **self.settings(), "help": SETTINGS}, f, indent=2)

    def video_inputs(self, video, video_fps: float | None = None) -> dict[str, torch.Tensor]:
        """``pixel_values`` (F, 3, R, R) and ``frame_mask`` (F, R, R) of one video."""
        if isinstance(video, (str, os.PathLike, bytes, memoryview)):
            sample = self.pipeline(video)  # raises VideoDecodeError naming the file
            return {"pixel_values": sample["pixels"], "frame_mask": sample["frame_mask"]}
        frames = np.asarray(video.numpy() if isinstance(video, torch.Tensor) else video)
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"video frames must be a (T, H, W, 3) uint8 array; got shape {frames.shape}")
        picked = sample_frame_indices(len(frames), video_fps or self.sample_fps, self.frames, self.sample_fps)
        pixels, mask = preprocess_frames(frames[picked], self.frames, self.resolution, self.patch_size, self.ratio)
        return {"pixel_values": pixels, "frame_mask": mask}

    def __call__(self, video=None, text: str = "", video_fps: float | None = None, return_tensors: str = "pt",
                 **kwargs) -> dict[str, torch.Tensor]:
        if video is None:
            raise ValueError("a panda checkpoint answers about a video: pass video=PATH (or its frames)")
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors={return_tensors!r}: this processor returns PyTorch tensors ('pt')")
        ids = tokenize_prompt(self.tokenizer, self.template, text, self.frames)[None]  # (1, N)
        visual = self.video_inputs(video, video_fps)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "pixel_values": visual["pixel_values"][None], "frame_mask": visual["frame_mask"][None]}

    def batch_decode(self, ids, **kwargs) -> list[str]:
        return [text.strip() for text in self.tokenizer.batch_decode(ids, **kwargs)]

    def decode(self, ids, **kwargs) -> str:
        return self.tokenizer.decode(ids, **kwargs).strip()
