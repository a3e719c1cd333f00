"""Export a ``train.py`` checkpoint in the release format; sharded (FSDP) checkpoints are
consolidated on the way, on one machine, without a process group.

    python -m panda.export outputs/RUN/checkpoints/last.ckpt --out exported/          # HF folder
    python -m panda.export outputs/RUN/checkpoints/last.ckpt --out exported/ --format hf   # no panda needed to load
    python -m panda.export outputs/RUN/checkpoints/last.ckpt --out vision.safetensors --trainable-only
    python -m panda.export outputs/RUN/checkpoints/last.ckpt --out exported/ --single-file full.ckpt
    python -m panda.export outputs/RUN/checkpoints/last.ckpt --out adapter/ --adapter-only   # LoRA runs

A run with LoRA adapters on its LLM (``llm.adapter=lora``) is exported with the adapters merged
into the LLM's weights (an ordinary Hugging Face LLM, nothing of peft needed to load it); with
``--adapter-only`` the folder holds the adapter alone in peft's format
(``peft.PeftModel.from_pretrained(base_llm, folder)``).

The release folder loads with ``AutoModelForCausalLM.from_pretrained`` (the LLM) and with
``panda.models.checkpoints.load_release`` (everything); the trainable-only file holds STAB, the
projector and the distillation head in release key names. ``--format hf`` writes the whole model
with its code (:mod:`panda.hub`): ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``
and ``AutoProcessor.from_pretrained(folder, trust_remote_code=True)`` load it without panda.
"""

from __future__ import annotations

import argparse
import os
import sys

from panda import check_torchvision
from panda.data.tokenizer import save_tokenizer
from panda.models.adapters import has_adapter, merge_lora, save_adapter
from panda.models.checkpoints import export_release, export_trainable, model_meta


def main(argv=None) -> int:
    check_torchvision()  # a .ckpt builds through Lightning's data module: explain a broken torchvision first
    parser = argparse.ArgumentParser(prog="python -m panda.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a .ckpt written by train.py")
    parser.add_argument("--out", required=True, help="output folder (or .safetensors file with --trainable-only)")
    parser.add_argument("--trainable-only", action="store_true", help="STAB + projector + head only")
    parser.add_argument("--adapter-only", action="store_true",
                        help="LoRA runs: write the LLM's adapter alone (peft format) instead of merging it")
    parser.add_argument("--license", help="the model card's Hub license id (default: the base LLM folder's, else other)")
    parser.add_argument("--single-file", help="also write the consolidated Lightning checkpoint to this .ckpt file")
    parser.add_argument("--format", choices=["release", "hf"], default="release",
                        help="release: the Video-Panda release's layout (panda or the release's code loads it); "
                             "hf: Hugging Face-native, the model's code inside (transformers loads it with "
                             "trust_remote_code=True, no panda needed)")
    args = parser.parse_args(argv)
    if args.format == "hf" and (args.trainable_only or args.adapter_only):
        parser.error("--format hf writes the whole model; --trainable-only and --adapter-only are release-format files")
    if not args.checkpoint.rstrip("/").endswith(".ckpt") or not os.path.exists(args.checkpoint):
        print(f"panda.export: error: {args.checkpoint} is not a .ckpt file or sharded .ckpt folder written by train.py",
              file=sys.stderr)
        return 2
    from panda.loading import load_checkpoint, read_lightning_checkpoint

    if args.single_file:
        import torch

        torch.save(read_lightning_checkpoint(args.checkpoint), args.single_file)
        print(args.single_file)
    loaded = load_checkpoint(args.checkpoint)
    llm = loaded.model.llm
    if args.adapter_only:
        if not has_adapter(llm):
            print(f"panda.export: error: {args.checkpoint} has no LoRA adapter (its run had llm.adapter=none)", file=sys.stderr)
            return 2
        cfg = loaded.run_config
        print(save_adapter(llm, cfg.llm.lora, args.out, base=cfg.llm.pretrained or cfg.init.path))
        return 0
    if has_adapter(llm):
        merge_lora(llm)  # W + B·A·alpha/r: the exported LLM is a plain Hugging Face model
    if args.format == "hf":
        from panda.hub.bundle import BundleError
        from panda.hub.export import export_hf

        try:
            export_hf(loaded.model, loaded.tokenizer, args.out, loaded.frames, loaded.eval_template, loaded.tokenization)
        except BundleError as exc:
            print(f"panda.export: error: {exc}", file=sys.stderr)
            return 2
        from panda.model_card import write_model_card

        write_model_card(loaded, args.checkpoint, args.out, "hf", license=args.license)  # README.md
        print(args.out)
        return 0
    meta = model_meta(loaded.model, frames=loaded.frames, template=loaded.template, eval_template=loaded.eval_template,
                      tokenization=loaded.tokenization)
    if args.trainable_only:
        path = export_trainable(loaded.model, args.out, meta)
    else:
        path = save_tokenizer(loaded.tokenizer, export_release(loaded.model, args.out, meta))
        from panda.model_card import write_model_card

        write_model_card(loaded, args.checkpoint, path, "release", license=args.license)  # README.md
    print(path)
    return 0

if __name__ == "__main__":
    sys.exit(main())
