"""LoRA / QLoRA on the LLM (``llm.adapter``), with peft.

The adapters are injected **in place** (``peft.inject_adapter_in_model``): the LLM stays the Hugging
Face model it was, so everything panda does with it (splicing visual tokens into its embeddings,
the decoder's hidden states for the distillation head, the LM head on supervised positions only,
FSDP units per decoder layer) is unchanged. Each targeted ``nn.Linear`` becomes a peft
``LoraLayer`` holding the frozen original (``base_layer``) and the trainable ``lora_A``/``lora_B``;
state-dict keys gain ``.base_layer`` and ``.lora_A.default`` parts, so a checkpoint holds the
adapter beside the frozen weights and resumes exactly.

:func:`merge_lora` folds the adapters into the base weights (``W + B·A·alpha/r``) and puts the
plain ``nn.Linear`` back: the merged LLM is an ordinary Hugging Face model again (what
``panda.export`` writes by default). :func:`save_adapter` writes the adapter alone in peft's own
folder format, which ``peft.PeftModel.from_pretrained(base_llm, folder)`` reads.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from panda.errors import PandaError

ADAPTER_MARK = "lora_"  # in the name of every adapter parameter (lora_A, lora_B, lora_embedding_*)


class AdapterUnavailable(PandaError):
    """``llm.adapter`` cannot run here; the message says why and what to do."""


def check_adapter(adapter: str, lora, accelerator: str = "auto") -> None:
    """Stop at config time (one line) when the adapter cannot run on this machine."""
    try:
        import peft  # noqa: F401
    except ImportError as exc:
        raise AdapterUnavailable(f"llm.adapter={adapter} needs peft: pip install peft ({exc})") from exc
    if lora.rank < 1:
        raise ValueError(f"llm.lora.rank={lora.rank} must be >= 1")
    if not lora.target_modules:
        raise ValueError("llm.lora.target_modules is empty: name the LLM's linear layers to adapt (e.g. [q_proj,v_proj])")
    if str(adapter) == "qlora":
        if accelerator == "cpu" or not torch.cuda.is_available():
            raise AdapterUnavailable(
                "llm.adapter=qlora quantises the LLM to 4 bits with bitsandbytes, which needs a CUDA GPU; this run has "
                "none: use llm.adapter=lora (same adapters on the unquantised LLM)")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise AdapterUnavailable(f"llm.adapter=qlora needs bitsandbytes with CUDA: pip install bitsandbytes ({exc})") from exc


def quantization_config(dtype: str):
    """The 4-bit NF4 loading config of ``llm.adapter=qlora`` (double quantisation, compute in ``dtype``)."""
    from transformers import BitsAndBytesConfig

    compute = getattr(torch, dtype) if dtype in ("bfloat16", "float16") else torch.bfloat16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def peft_lora_config(lora, base: str | None = None):
    from peft import LoraConfig

    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM",
                      base_model_name_or_path=base)


def add_lora(llm: nn.Module, lora) -> int:
    """Inject LoRA adapters into ``llm`` in place; freeze its own weights. Returns adapter parameters.

    Raises ``ValueError`` naming the linear layers the LLM has when no target module matches."""
    from peft import inject_adapter_in_model

    linear_names = sorted({name.rsplit(".", 1)[-1] for name, m in llm.named_modules() if isinstance(m, nn.Linear)})
    if not any(t in linear_names for t in lora.target_modules):
        raise ValueError(f"llm.lora.target_modules={list(lora.target_modules)} matches no linear layer of "
                         f"{type(llm).__name__}; its linear layers are {linear_names}")
    llm.requires_grad_(False)
    inject_adapter_in_model(peft_lora_config(lora, getattr(llm, "name_or_path", None)), llm)
    params = adapter_parameters(llm)
    for p in params.values():
        p.requires_grad_(True)
    return sum(p.numel() for p in params.values())


def apply_adapter(llm: nn.Module, llm_cfg) -> int:
    """What ``llm.adapter`` asks for (``llm_cfg`` an LLMConfig): LoRA injected for lora / qlora,
    nothing for none. Returns the adapter parameters (0 without)."""
    if str(llm_cfg.adapter) == "none":
        return 0
    return add_lora(llm, llm_cfg.lora)


def has_adapter(llm: nn.Module) -> bool:
    return any(ADAPTER_MARK in name for name, _ in llm.named_parameters())


def adapter_parameters(llm: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in llm.named_parameters() if ADAPTER_MARK in name}


def set_adapter_trainable(llm: nn.Module, trainable: bool) -> None:
    """A stage that trains the LLM trains its adapters only; the LLM's own weights stay frozen."""
    llm.requires_grad_(False)
    for p in adapter_parameters(llm).values():
        p.requires_grad_(trainable)


def merge_lora(llm: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain layer back (in place)."""
    from peft.tuners.lora import LoraLayer

    layers = [(name, m) for name, m in llm.named_modules() if isinstance(m, LoraLayer)]
    for name, module in layers:
        module.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        parent = llm.get_submodule(parent_name) if parent_name else llm
        setattr(parent, child, module.get_base_layer())
    if hasattr(llm, "peft_config"):
        del llm.peft_config
    return llm


def adapter_state(llm: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights under peft's saved key names (``base_model.model.<path>.lora_A.weight``)."""
    return {"base_model.model." + name.replace(".default", ""): p.detach().contiguous().cpu()
            for name, p in adapter_parameters(llm).items()}


def save_adapter(llm: nn.Module, lora, out_dir: str, base: str | None = None) -> str:
    """peft's adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) for the LLM."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    config = peft_lora_config(lora, base).to_dict()
    config["target_modules"] = sorted(config["target_modules"])
    config["peft_type"] = str(getattr(config["peft_type"], "value", config["peft_type"]))
    config["task_type"] = str(getattr(config["task_type"], "value", config["task_type"]))
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2, default=str)
    save_file(adapter_state(llm), os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    return out_dir
