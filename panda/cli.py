"""The ``panda`` command: one entry point for everything panda runs, a subcommand each.

    panda train experiment=ablation/no_fsra          # = python train.py ... in a checkout
    panda evaluate checkpoint=outputs/.../last.ckpt  # = python evaluate.py ...
    panda plan experiment=videopanda_7b/stage2_pretrain gpu=h100_80g
    panda chat --checkpoint DIR --video FILE "What is happening?"
    panda demo --checkpoint DIR                      # the same in a web page, multi-turn
    panda prepare --records r.json --video-root videos --output shards
    panda export outputs/RUN/checkpoints/last.ckpt --out exported/
    panda collect multirun/DATE --out results/

``train`` and ``evaluate`` take Hydra's command line (overrides, ``--multirun``, ``--config-dir``,
``--cfg job``, ``--help``); the others take their module's arguments (``panda plan ...`` is
``python -m panda.plan ...``). This module imports no subcommand until one is chosen, so
``panda --help`` answers at once.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import sys

# subcommand -> (module whose main() runs it, one line for ``panda --help``)
COMMANDS = {
    "train": ("panda.train", "train a model (Hydra overrides: panda train experiment=ablation/no_fsra)"),
    "evaluate": ("panda.evaluate", "evaluate a checkpoint on benchmarks (panda evaluate checkpoint=PATH)"),
    "plan": ("panda.plan", "memory, FLOPs and time of a training run before it runs (train's overrides, gpu=)"),
    "chat": ("panda.chat", "ask a checkpoint about a video (--checkpoint DIR --video FILE \"question\")"),
    "demo": ("panda.demo", "a web page to chat with a checkpoint about videos (--checkpoint DIR; needs panda[demo])"),
    "prepare": ("panda.data.prepare", "turn records and videos into training shards (--records --video-root --output)"),
    "export": ("panda.export", "export a training checkpoint in the release format (CKPT --out DIR)"),
    "collect": ("panda.experiments.collect", "tables and plots of a --multirun folder (MULTIRUN_DIR --out DIR)"),
}
HYDRA_COMMANDS = ("train", "evaluate")  # Hydra applications: their command line is Hydra's


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: panda <command> [arguments]", "", "Train, ablate and evaluate encoder-free video-language models.",
             "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "panda <command> --help shows a command's own options. In a checkout, python train.py and",
              "python evaluate.py are panda train and panda evaluate."]
    return "\n".join(lines)


def _as_hydra_app(command: str, module: str) -> None:
    """Make this process look like ``python -m <module>`` started it, as far as Hydra and Lightning
    look: Hydra reads ``sys.argv[1:]`` as its command line, and Lightning starts the other ranks of a
    one-machine DDP run by running ``python -m <__main__.__spec__.name> <sys.argv[1:]>`` again (with
    no spec it would run ``sys.argv[0]``, here the ``panda`` script, without the subcommand)."""
    sys.modules["__main__"].__spec__ = importlib.util.find_spec(module)
    sys.argv = [f"panda {command}"]  # the arguments follow in the module's main()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        from panda import __version__

        print(f"panda {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f"did you mean `panda {close[0]}`?" if close else f"the commands are: {', '.join(COMMANDS)}"
        print(f"panda: unknown command {command!r}; {hint} (panda --help lists them)", file=sys.stderr)
        return 2
    module = COMMANDS[command][0]
    if command in HYDRA_COMMANDS:
        _as_hydra_app(command, module)
        importlib.import_module(module).main(rest, prog=f"panda {command}")
        return 0
    return importlib.import_module(module).main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
