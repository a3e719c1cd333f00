"""Write a model as a Hugging Face–native folder (``panda export CKPT --out DIR --format hf``): the
weights of STAB, the projector and the LLM under one ``model.safetensors`` index, the tokenizer, the
processor's settings, the stop tokens ``panda chat`` uses, and the code (:mod:`panda.hub.bundle`)."""

from __future__ import annotations

import dataclasses
import os

from transformers import GenerationConfig

from panda.data.conversation import get_template, stop_token_ids
from panda.data.tokenizer import save_tokenizer
from panda.hub.bundle import AUTO_MAP, BundleError, module_closure, write_code
from panda.hub.configuration import PandaVideoConfig
from panda.hub.modeling import PandaVideoForCausalLM
from panda.hub.processing import PandaVideoProcessor
from panda.models.stab import PROJECTORS, REDUCERS
from panda.models.video_lm import VideoLanguageModel

# what panda chat answers with unless told otherwise
CHAT_MAX_NEW_TOKENS = 256
CHAT_SAMPLE_FPS = 1.0


def _check_parts_travel(model: VideoLanguageModel, bundled: list[str]) -> None:
    """A spatial reducer or projector registered by a plugin module lives outside panda (``bundled``, the
    modules the folder carries): its code would not be in the folder."""
    parts = {"stab.lsd": (model.stab_cfg.lsd, REDUCERS[model.stab_cfg.lsd]),
             "model.projector": (model.projector_kind, PROJECTORS[model.projector_kind])}
    for key, (name, part) in parts.items():
        if part.__module__ not in bundled:
            raise BundleError(f"{key}={name} comes from the plugin module {part.__module__}, whose code an HF folder "
                              "does not carry; use --format release (panda loads it with plugins=[...])")


def export_hf(model: VideoLanguageModel, tokenizer, out_dir: str, frames: int, template: str, tokenization: str,
              sample_fps: float = CHAT_SAMPLE_FPS, max_new_tokens: int = CHAT_MAX_NEW_TOKENS) -> list[str]:
    """Write ``model`` (LoRA already merged) into ``out_dir``; returns the files written. The
    distillation head (read only in training) is left out."""
    modules = module_closure()
    _check_parts_travel(model, modules)
    os.makedirs(out_dir, exist_ok=True)
    stab = {k: str(v) if isinstance(v, str) else v for k, v in dataclasses.asdict(model.stab_cfg).items()}
    llm = model.llm
    config = PandaVideoConfig(stab=stab, projector=model.projector_kind, text_config=llm.config,
                              architectures=[PandaVideoForCausalLM.__name__], auto_map=dict(AUTO_MAP),
                              dtype=str(next(llm.parameters()).dtype).removeprefix("torch."))
    chat_format = get_template(template, tokenization, tokenizer)
    head, model.distill_head = model.distill_head, None
    try:
        wrapped = PandaVideoForCausalLM(config, video_lm=model)
        stops = stop_token_ids(chat_format, tokenizer, llm)
        wrapped.generation_config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                                     eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
        wrapped.save_pretrained(out_dir)
    finally:
        model.distill_head = head
    save_tokenizer(tokenizer, out_dir)
    PandaVideoProcessor(tokenizer, frames, model.stab_cfg.resolution, model.stab_cfg.patch_size, model.stab_cfg.ratio,
                        sample_fps, template, tokenization).save_pretrained(out_dir)
    write_code(out_dir, modules)
    return sorted(os.listdir(out_dir))
