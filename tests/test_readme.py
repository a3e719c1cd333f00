"""README.md is the front door: at most 250 lines, its two commands first, its links into docs/
resolving, its config cheat-sheet naming every group and option of conf/ and only schema keys, every
command in it naming options the code has, and its runnable blocks running.

A shell block is runnable when the line before its fence is an HTML comment:

- ``<!-- runnable -->``: cheap; run as written;
- ``<!-- runnable: expensive; the test appends OVERRIDES -->``: minutes as written; run with
  OVERRIDES after every training command (the README says so next to the block). An expensive
  block without ``the test appends`` is only checked, never run.

Blocks without a marker hold paths a user fills in: their commands are checked (overrides against
the config schema and conf/ groups, flags against each module's own argument parser), not run.
"""

import argparse
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass

import pytest

from conftest import REPO

README = os.path.join(REPO, "README.md")
MAX_LINES = 250
INSTALL = ("bash install.sh && .venv/bin/python train.py", "bash install.sh && .venv/bin/panda train")
TESTS = ".venv/bin/python -m pytest -q"
MARKER = re.compile(r"^<!--\s*runnable(?::\s*(?P<kind>cheap|expensive)(?:;\s*the test appends\s+(?P<extra>.*?))?)?\s*-->$")
# the entry points a README command may start, in both spellings (python ... and the console script)
SCRIPTS = {"train.py": "train", "evaluate.py": "evaluate"}
MODULES = {"panda.plan": "plan", "panda.chat": "chat", "panda.demo": "demo", "panda.data.prepare": "prepare",
           "panda.export": "export", "panda.experiments.collect": "collect"}
SUBCOMMANDS = {**{v: k for k, v in SCRIPTS.items()}, **{v: k for k, v in MODULES.items()}}


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    text: str
    marker: str | None  # the runnable comment before the fence, if any
    kind: str | None = None  # cheap | expensive (runnable blocks only)
    extra: str = ""  # expensive: what the test appends to every training command

    @property
    def runnable(self) -> bool:
        return self.marker is not None

    @property
    def id(self) -> str:
        return f"line{self.line}"


def readme_lines() -> list[str]:
    with open(README, encoding="utf-8") as f:
        return f.read().splitlines()


def shell_blocks() -> list[Block]:
    lines, blocks, i = readme_lines(), [], 0
    while i < len(lines):
        if lines[i].strip() in ("```bash", "```sh", "```shell"):
            j = i + 1
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            prev = next((lines[k].strip() for k in range(i - 1, -1, -1) if lines[k].strip()), "")
            m = MARKER.match(prev)
            blocks.append(Block(i + 1, "\n".join(lines[i + 1:j]), prev if m else None,
                                (m.group("kind") or "cheap") if m else None, (m.group("extra") or "") if m else ""))
            i = j
        i += 1
    return blocks


def commands(text: str) -> list[str]:
    """The block's commands: continuation lines joined, comments and blank lines dropped."""
    out, current = [], ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        words = shlex.split(current, comments=True)
        if words:
            out.append(current.strip())
        current = ""
    return out


def entry_point(words: list[str]) -> tuple[str, list[str]] | None:
    """(``train``|``evaluate``|``plan``|``chat``|``prepare``|``export``|``collect``, its arguments) of a
    command, in either spelling; None for any other command."""
    prog = os.path.basename(words[0]) if words else ""
    if prog == "panda" and len(words) > 1 and words[1] in SUBCOMMANDS:
        return words[1], words[2:]
    if prog in ("python", "python3"):
        if len(words) > 1 and words[1] in SCRIPTS:
            return SCRIPTS[words[1]], words[2:]
        if len(words) > 2 and words[1] == "-m" and words[2] in MODULES:
            return MODULES[words[2]], words[3:]
    return None


def runnable_blocks() -> list[Block]:
    return [b for b in shell_blocks() if b.runnable and (b.kind == "cheap" or b.extra)]


# ---------------------------------------------------------------------------------------- the page


def test_the_readme_is_at_most_250_lines():
    assert len(readme_lines()) <= MAX_LINES, f"README.md has {len(readme_lines())} lines; the rest belongs in docs/"


def test_the_two_commands_come_first_and_ci_runs_the_test_command():
    first = shell_blocks()[0]
    assert commands(first.text)[0] in INSTALL and commands(first.text)[1] == TESTS and len(commands(first.text)) == 2
    headings = [line for line in readme_lines()[: first.line - 1] if line.startswith("#")]
    assert len(headings) <= 2, f"the two commands come after {headings}: they belong first, under the title"
    if commands(first.text)[0].endswith("panda train"):  # the console script form needs the script
        with open(os.path.join(REPO, "pyproject.toml"), encoding="utf-8") as f:
            assert re.search(r"^panda\s*=", f.read(), re.M), "README runs .venv/bin/panda, pyproject.toml declares none"
    with open(os.path.join(REPO, ".ci", "run"), encoding="utf-8") as f:
        assert TESTS in [line.strip() for line in f], ".ci/run no longer runs the README's test command"
    assert "minutes" in first.text  # how long it takes is stated


def test_every_link_into_docs_resolves():
    text = "\n".join(readme_lines())
    links = set(re.findall(r"\]\((docs/[^)#\s]+)(?:#[^)]*)?\)", text))
    assert links, "README.md links no docs/ page"
    missing = sorted(link for link in links if not os.path.isfile(os.path.join(REPO, link)))
    assert not missing, f"README.md links to pages that do not exist: {missing}"


def test_the_markers_are_well_formed():
    lines = readme_lines()
    for i, line in enumerate(lines):
        if "runnable" in line and line.strip().startswith("<!--"):
            assert MARKER.match(line.strip()), f"line {i + 1}: unreadable marker {line!r}"
            nxt = next((lines[k].strip() for k in range(i + 1, len(lines)) if lines[k].strip()), "")
            assert nxt in ("```bash", "```sh", "```shell"), f"line {i + 1}: the marker is not right before a shell block"
    assert runnable_blocks(), "no runnable block"
    for block in shell_blocks():
        if block.kind == "expensive" and block.extra:
            assert any((e := entry_point(shlex.split(c))) and e[0] == "train" for c in commands(block.text))


def _table(first_header: str) -> list[list[str]]:
    """The rows (cells) of the README table whose header starts with ``| first_header |``."""
    lines, rows = readme_lines(), []
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def _names(cell: str) -> set[str]:
    """The backticked names of a cell, brace lists expanded (`a/{b,c}` is a/b and a/c)."""
    names = set()
    for token in re.findall(r"`([^`]+)`", cell):
        m = re.fullmatch(r"([^{]*)\{([^}]*)\}(.*)", token)
        names |= {m.group(1) + part + m.group(3) for part in m.group(2).split(",")} if m else {token}
    return names


def test_the_cheat_sheet_lists_every_config_group_and_option():
    conf = os.path.join(REPO, "conf")
    table = [(_names(cell), {n for n in _names(options) if "=" not in n}) for cell, options in _table("group")]
    rows = {group: options for names, options in table for group in names}
    groups = {}
    for dirpath, _, files in os.walk(conf):
        group = os.path.relpath(dirpath, conf)
        top = group.split(os.sep)[0]
        options = [f[:-5] for f in files if f.endswith(".yaml")]
        if group == "." or not options:
            continue
        name = group.replace(os.sep, "/") if top == "hydra" else top
        prefix = "/".join(group.split(os.sep)[1:]) if top != "hydra" else ""
        groups.setdefault(name, set()).update(f"{prefix}/{o}" if prefix else o for o in options)
    assert set(groups) <= set(rows), f"config groups missing from the cheat-sheet: {sorted(set(groups) - set(rows))}"
    for group, options in groups.items():
        assert options <= rows[group], f"{group}: options missing from the cheat-sheet: {sorted(options - rows[group])}"
    for names, options in table:  # Hydra's own joblib launcher is the one option not in conf/
        extra = options - set().union(*(groups.get(g, set()) for g in names)) - {"joblib"}
        assert not extra, f"{sorted(names)}: the cheat-sheet names options conf/ lacks: {sorted(extra)}"


def test_the_cheat_sheet_keys_are_schema_keys():
    from panda.config import TrainConfig
    from panda.overrides import schema_key

    keys = {name.split("=")[0] for cell, _ in _table("key") for name in _names(cell)}
    assert len(keys) >= 15
    for key in keys - {"hydra.run.dir", "logger"}:
        assert schema_key(key, TrainConfig)[1] is None, f"the cheat-sheet names {key}, which the schema lacks"


# ---------------------------------------------------------------------- every command, checked


def _all_commands() -> list[tuple[Block, str]]:
    return [(b, c) for b in shell_blocks()[1:] for c in commands(b.text)]


class _Parsed(Exception):
    pass


def _parse_only(monkeypatch, module: str, argv: list[str]) -> argparse.Namespace:
    """The module's own main() parses ``argv`` and stops there (nothing runs)."""
    parse = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise _Parsed(parse(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    with pytest.raises(_Parsed) as parsed:
        importlib.import_module(module).main(argv)
    return parsed.value.args[0]


@pytest.mark.parametrize("block,command", [pytest.param(b, c, id=f"{b.id}-{(entry_point(shlex.split(c, comments=True)) or ('?',))[0]}")
                                           for b, c in _all_commands()])
def test_every_command_names_options_the_code_has(block, command, monkeypatch):
    from panda.config import EvaluateConfig, TrainConfig
    from panda.overrides import check_overrides, hydra_overrides
    from panda.plan import GPUS, PLAN_KEYS

    words = shlex.split(command, comments=True)
    entry = entry_point(words)
    assert entry is not None, f"README line {block.line}: a command the README should not need: {command}"
    name, args = entry
    if name in ("train", "evaluate"):
        overrides, config_dir = hydra_overrides(args)
        check_overrides(overrides, TrainConfig if name == "train" else EvaluateConfig, name,
                        extra_dirs=[config_dir] if config_dir else ())
    elif name == "plan":
        args = [a for a in args if a != "--json"]
        opts = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if a.split("=", 1)[0] in PLAN_KEYS}
        assert opts.get("gpu", "h100_80g") in GPUS
        check_overrides([a for a in args if a.split("=", 1)[0] not in PLAN_KEYS], TrainConfig, "train")
    elif name == "prepare":
        from panda.data.prepare import parse_args

        parse_args(args)  # argparse exits 2 naming a flag it does not know
    else:
        _parse_only(monkeypatch, MODULES_BY_NAME[name], args)


MODULES_BY_NAME = {v: k for k, v in MODULES.items()}


# --------------------------------------------------------------------------- runnable blocks, run

def _arg(block: Block, pattern: str) -> str:
    return re.search(pattern, block.text).group(1)


def _quick_run(out: str, cwd: str, block: Block) -> bool:
    """train -> evaluate -> chat -> export: the run trained the steps it was given and scored the whole
    held-out split, evaluate.py re-scored it to the same accuracy, and the export is a Hugging Face–native
    folder (its config names the folder's own model class; tests/test_hf_export.py loads such folders)."""
    run = os.path.join(cwd, _arg(block, r"train\.py .*hydra\.run\.dir=(\S+)"))
    summary = json.load(open(os.path.join(run, "summary.json")))
    evaluated = os.path.join(cwd, _arg(block, r"evaluate\.py .*hydra\.run\.dir=(\S+)"), "results.json")
    results = json.load(open(evaluated))["benchmarks"]["synthetic"]
    exported = os.path.join(cwd, _arg(block, r"panda\.export .*--out (\S+)"))
    config = json.load(open(os.path.join(exported, "config.json")))
    return (summary["train/steps"] == int(_arg(block, r"trainer\.max_steps=(\d+)"))
            and summary["eval/judged"] == summary["eval/num_questions"] == results["judged"] > 0
            and results["accuracy"] == summary["eval/accuracy"]
            and config["auto_map"]["AutoModelForCausalLM"] == "modeling_panda.PandaVideoForCausalLM"
            and all(os.path.isfile(os.path.join(exported, f)) for f in ("modeling_panda.py", "README.md")))


def _sweep(out: str, cwd: str, block: Block) -> bool:
    """--multirun -> collect: every point of the sweep finished and the collector wrote its table."""
    runs = re.search(r"(\d+) runs \(0 failed\)", out)
    return bool(runs) and int(runs.group(1)) > 1 and os.path.isfile(
        os.path.join(cwd, _arg(block, r"panda\.experiments\.collect .*--out (\S+)"), "summary.md"))


# what each runnable block must leave behind, by the entry point and first arguments of its first command
EXPECT = {
    "train trainer.max_steps=": _quick_run,
    "plan ": lambda out, cwd, block: "verdict: fits" in out and "FLOPs per sample" in out,
    "train experiment=ablation/no_lste frames=8 --cfg job": lambda out, cwd, block: "use_lste: false" in out and "frames: 8" in out,
    "train --multirun": _sweep,
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> str:
    """A folder that looks like the repository root to the README's commands (train.py, evaluate.py and
    conf/ from the repository), writing nothing into it. The synthetic dataset is the repository's cached
    copy when it has one (linked file by file: a stale copy is regenerated here, never there)."""
    cwd = str(tmp_path_factory.mktemp("readme"))
    for script in SCRIPTS:
        shutil.copy(os.path.join(REPO, script), cwd)
    os.symlink(os.path.join(REPO, "conf"), os.path.join(cwd, "conf"))
    cache = os.path.join(REPO, "data_cache", "synthetic")
    if os.path.isfile(os.path.join(cache, "DONE")):
        shutil.copytree(cache, os.path.join(cwd, "data_cache", "synthetic"), copy_function=os.symlink)
    return cwd


@pytest.mark.slow
@pytest.mark.parametrize("block", runnable_blocks(), ids=lambda b: b.id)
def test_runnable_blocks_run(block, workdir):
    env = {**os.environ, "PATH": os.path.join(REPO, ".venv", "bin") + os.pathsep + os.environ.get("PATH", ""),
           "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    output = ""
    for command in commands(block.text):
        entry = entry_point(shlex.split(command, comments=True))
        if block.extra and entry and entry[0] == "train":
            command = command.split(" #", 1)[0] + " " + block.extra
        proc = subprocess.run(["bash", "-c", command], cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
        output += proc.stdout + proc.stderr
        assert proc.returncode == 0, f"README line {block.line}: `{command}` exited {proc.returncode}:\n{output[-4000:]}"
    first = entry_point(shlex.split(commands(block.text)[0], comments=True))
    key = " ".join([first[0], *first[1]]) if first else ""
    checks = [check for prefix, check in EXPECT.items() if key.startswith(prefix)]
    assert checks, f"README line {block.line}: a runnable block the test has no expectation for (add one to EXPECT)"
    assert all(check(output, workdir, block) for check in checks), output[-4000:]
