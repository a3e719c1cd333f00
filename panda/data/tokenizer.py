"""Tokenizers: a locally trained one for the synthetic default, or any Hugging Face folder.

The synthetic default needs no download: :func:`train_tokenizer` fits a small LLaMA-style BPE
(Metaspace pre-tokenizer, ``<unk>``=0, ``<s>``=1, ``</s>``=2) on the dataset's own text in well
under a second and saves it as a ``PreTrainedTokenizerFast`` folder.
"""

from __future__ import annotations

import os

from panda.constants import IMAGE_TOKEN

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]


def train_tokenizer(texts: list[str], out_dir: str, vocab_size: int = 512) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + [IMAGE_TOKEN], show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<unk>",
        additional_special_tokens=[IMAGE_TOKEN],
        padding_side="right",
    )
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return out_dir


def load_tokenizer(path: str):
    """Load a fast tokenizer from a local folder and make sure it has the image placeholder token.

    A tokenizer without a pad token pads with ``unk`` (the Vicuna convention).
    """
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer folder not found: {path} (set llm.tokenizer to a local folder)")
    tok = AutoTokenizer.from_pretrained(path, use_fast=True)
    if not tok.is_fast:
        raise ValueError(f"{path}: panda needs a fast tokenizer (offsets decide the label mask)")
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token
    tok.padding_side = "right"
    return tok
