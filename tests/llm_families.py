"""Tiny stand-ins for the LLM families panda's ``llm=`` presets name, built here with no download:
a tokenizer trained on the spot with the family's special tokens and a chat template written for
these tests in the family's format, and a randomly initialised model of the family's transformers
class, saved as a local Hugging Face folder.

    qwen2   Qwen2ForCausalLM, byte-level BPE, no BOS, turns <|im_start|>role ... <|im_end|>,
            EOS <|endoftext|> (the base model's), so the turn end differs from EOS
    llama3  LlamaForCausalLM, byte-level BPE, BOS <|begin_of_text|> written by the template,
            turns <|start_header_id|>role<|end_header_id|> ... <|eot_id|>, no unk and no pad token
    mistral MistralForCausalLM, Metaspace BPE, BOS <s> written by the template, [INST] q [/INST]a</s>
"""

from __future__ import annotations

import os

QWEN2_TEMPLATE = (
    "{% for m in messages %}"
    "{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)

FAMILIES = {
    "qwen2": dict(specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None, eos="<|endoftext|>",
                  unk=None, pad="<|endoftext|>", template=QWEN2_TEMPLATE, byte_level=True, turn_end="<|im_end|>",
                  model="qwen2", preset="qwen2_5"),
    "llama3": dict(specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                             "<|eot_id|>"], bos="<|begin_of_text|>", eos="<|end_of_text|>", unk=None, pad=None,
                   template=LLAMA3_TEMPLATE, byte_level=True, turn_end="<|eot_id|>", model="llama", preset="llama3"),
    "mistral": dict(specials=["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], bos="<s>", eos="</s>", unk="<unk>",
                    pad=None, template=MISTRAL_TEMPLATE, byte_level=False, turn_end="</s>", model="mistral",
                    preset="mistral"),
}

CORPUS = [
    "What colour is the moving object? The object is red.",
    "Which way does the shape move? It moves to the left.",
    "What shape is in the video? A blue square moving right.",
    "Describe the video in detail. A green triangle slides across a grey background.",
    "You are a helpful assistant.",
] * 4


def family_tokenizer(family: str, out_dir: str, extra_texts=()):
    """Train and save the family's tokenizer in ``out_dir``; returns the loaded fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = FAMILIES[family]
    if spec["byte_level"]:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        alphabet = sorted(set("".join(CORPUS + list(extra_texts))) | set("\n"))
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=spec["specials"], initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(CORPUS + list(extra_texts), trainer)
    named = {k: spec[k] for k in ("bos", "eos", "unk", "pad") if spec[k]}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **{f"{k}_token": v for k, v in named.items()})
    fast.add_special_tokens({"additional_special_tokens": [t for t in spec["specials"] if t not in named.values()]})
    fast.chat_template = spec["template"]
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def family_llm_folder(family: str, out_dir: str, hidden: int = 32, layers: int = 2, extra_texts=(), seed: int = 0) -> str:
    """A local folder holding a tiny randomly initialised LLM of ``family`` and its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = family_tokenizer(family, out_dir, extra_texts)
    spec = FAMILIES[family]
    config = AutoConfig.for_model(
        spec["model"], vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=family == "qwen2")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tok.eos_token_id  # the turn end comes from the template, not from here
    model.save_pretrained(out_dir)
    return out_dir
