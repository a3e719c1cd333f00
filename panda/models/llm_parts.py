"""Where each part of a Hugging Face causal LM is, for any family, in one place: the decoder
layers (FSDP units, activation checkpointing), the modules after them (final norm, LM head), and
the text model's width and depth (the projector's output, the distillation head's layers).

The decoder-layer class comes from the model's own ``_no_split_modules`` (what transformers and
accelerate use to place whole layers on devices): ``LlamaDecoderLayer``, ``Qwen2DecoderLayer``,
``MistralDecoderLayer``, ``GPT2Block``, ... so a new family needs no entry here.
"""

from __future__ import annotations

from torch import nn

from panda.compat import no_split_modules

# where older or unusual models keep their layers, tried when _no_split_modules names nothing found
_LAYER_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "model.language_model.layers")


def decoder_layer_classes(llm: nn.Module) -> set[str]:
    """Class names of the LLM's decoder layers, from ``_no_split_modules``."""
    return no_split_modules(llm)


def is_decoder_layer(module: nn.Module, classes: set[str]) -> bool:
    """Whether ``module`` is one of ``classes`` (by name, also once FSDP2 has subclassed it as ``FSDP<name>``)."""
    return any(c.__name__ in classes for c in type(module).__mro__)


def layer_class_name(module: nn.Module, classes: set[str]) -> str:
    """The decoder-layer class of ``module`` (``Qwen2DecoderLayer`` for FSDP2's ``FSDPQwen2DecoderLayer``)."""
    return next((c.__name__ for c in type(module).__mro__ if c.__name__ in classes), type(module).__name__)


def decoder_layers(llm: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Hugging Face causal LM: the longest ``nn.ModuleList`` whose every
    entry is one of its ``_no_split_modules`` classes (else a known attribute path)."""
    classes = decoder_layer_classes(llm)
    found = [m for m in llm.modules() if isinstance(m, nn.ModuleList) and len(m)
             and all(is_decoder_layer(layer, classes) for layer in m)]
    if found:
        return max(found, key=len)
    for path in _LAYER_PATHS:
        try:
            module = llm.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, nn.ModuleList):
            return module
    raise ValueError(f"cannot find the decoder layers of {type(llm).__name__}: no ModuleList of its _no_split_modules "
                     f"{sorted(classes) or '(none declared)'} and none at {list(_LAYER_PATHS)}")


def llm_tail(llm: nn.Module) -> list[nn.Module]:
    """The LLM's modules after the decoder layers that hold parameters: the decoder's own children
    besides its layers and input embedding (the final norm), and an untied LM head."""
    layers, embed = decoder_layers(llm), llm.get_input_embeddings()
    decoder = getattr(llm, getattr(llm, "base_model_prefix", ""), None)
    tail = []
    if decoder is not None:
        tail = [m for m in decoder.children() if m is not layers and m is not embed and any(True for _ in m.parameters())]
    head = llm.get_output_embeddings()
    if head is not None and head.weight is not embed.weight:
        tail.append(head)
    return tail


def text_config(llm_or_config):
    """The text model's config (multimodal configs keep it under ``text_config``)."""
    config = getattr(llm_or_config, "config", llm_or_config)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def llm_width(llm: nn.Module) -> int:
    """The LLM's hidden size: what the projector maps STAB's tokens to."""
    return text_config(llm).hidden_size


def llm_depth(llm: nn.Module) -> int:
    """The LLM's decoder layers: the distillation head reads every ``layer_stride``-th of L + 1 states."""
    return text_config(llm).num_hidden_layers
