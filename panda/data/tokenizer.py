"""Tokenizers: a locally trained one for the synthetic default, or any Hugging Face folder.

The synthetic default needs no download: :func:`train_tokenizer` fits a small LLaMA-style BPE
(Metaspace pre-tokenizer, ``<unk>``=0, ``<s>``=1, ``</s>``=2) on the dataset's own text in well
under a second and saves it as a ``PreTrainedTokenizerFast`` folder.
"""

from __future__ import annotations

import os
import shutil

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]


def train_tokenizer(texts: list[str], out_dir: str, vocab_size: int = 512) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    # the newline between the frames and the question is in every prompt: never <unk>
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=["\n"],
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<unk>",
        padding_side="right",
    )
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return out_dir


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """Load the tokenizer of a local folder, unchanged: the frame placeholder is spliced in as an
    id and needs no vocabulary entry (so a Vicuna folder keeps its 32,000 rows). A tokenizer
    without a pad token pads with ``unk`` (the Vicuna convention), or with EOS where it has no
    ``unk`` either (LLaMA-3); padded positions are masked out of attention and labels.
    ``trust_remote_code``: a folder whose ``config.json`` names its own code (an HF-format export)."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer folder not found: {path} (set llm.tokenizer to a local folder)")
    tok = AutoTokenizer.from_pretrained(path, use_fast=True, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    if tok.pad_token is None:
        raise ValueError(f"the tokenizer in {path} has no pad, unk or eos token; add a pad_token to its tokenizer_config.json")
    tok.padding_side = "right"
    return tok


# files of a SentencePiece tokenizer folder the release's loader (transformers 4.31, use_fast=False) reads
SENTENCEPIECE_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def save_tokenizer(tokenizer, out_dir: str) -> str:
    """Save ``tokenizer`` so that both panda and the release's loader read it back as it was.

    ``save_pretrained`` of transformers 5 writes only ``tokenizer.json``; a tokenizer that came
    from a SentencePiece folder (Vicuna, LLaMA) also gets that folder's ``tokenizer.model``,
    ``tokenizer_config.json`` (with its ``legacy`` key) and ``special_tokens_map.json``, which
    the release tokenisation (:class:`panda.data.conversation.ReleaseTextEncoder`) and the
    official slow loader need.
    """
    from panda.data.conversation import sentencepiece_file

    os.makedirs(out_dir, exist_ok=True)
    source = sentencepiece_file(tokenizer)
    tokenizer.save_pretrained(out_dir)
    if source:
        folder = os.path.dirname(source)
        shutil.copyfile(source, os.path.join(out_dir, "tokenizer.model"))
        for name in SENTENCEPIECE_FILES[1:]:
            if os.path.isfile(os.path.join(folder, name)) and os.path.abspath(folder) != os.path.abspath(out_dir):
                shutil.copyfile(os.path.join(folder, name), os.path.join(out_dir, name))
    return out_dir
