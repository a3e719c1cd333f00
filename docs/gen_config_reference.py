"""Write docs/configuration.md: every key of the structured configs and every config group option.

    .venv/bin/python docs/gen_config_reference.py          # rewrite the page
    .venv/bin/python docs/gen_config_reference.py --check  # exit 1 when the page is out of date

The keys come from the dataclasses behind ``conf/train.yaml`` (``TrainConfig``) and
``conf/evaluate.yaml`` (``EvaluateConfig``), followed into every nested dataclass wherever it is
defined. A key's help text is the comment on its line and the comment lines directly above it in the
dataclass source; choices (``Choice`` enums) list their options with each option's comment. The groups
come from the folders of ``conf/``: each option with the first sentence of its leading comment and the
keys it sets.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import inspect
import io
import re
import sys
import textwrap
import tokenize
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "configuration.md"
COMMAND = ".venv/bin/python docs/gen_config_reference.py"

sys.path.insert(0, str(ROOT))

# references into design notes that are not shipped with the package: dropped from help text
_NOTE = r"(?:stab|training|architecture)\.md(?: §[\d.]+(?:,? ?§?[\d.]+)*)?"
_DROP = [
    re.compile(rf"\s*\((?:see )?{_NOTE}\)"),  # "(x.md §7)"
    re.compile(r"\s*\((?:README[^)]*)\)"),  # "(README, "The synthetic default")": the README is a front door now
    re.compile(rf"\s*{_NOTE}(?=[:;,)])"),  # "... (x.md §4): ..."
    re.compile(rf",?\s*\b{_NOTE}"),
    re.compile(r"\s*\(?\.\./shared[^\s)]*\)?"),
]
_DOC_PAGE = re.compile(r"\bdocs/([a-z0-9-]+)\.md\b")


def clean(text: str) -> str:
    for pattern in _DROP:
        text = pattern.sub("", text)
    text = re.sub(r"\(\s*\)", "", text)
    text = re.sub(r"\(\s*;\s*", "(", text)
    text = re.sub(r"\s*;\s*\)", ")", text)
    # a page of this site named in the source becomes a link to it
    text = _DOC_PAGE.sub(lambda m: f"[{m.group(1)}]({m.group(1)}.md)" if (ROOT / "docs" / f"{m.group(1)}.md").exists()
                         else m.group(0), text)
    return re.sub(r"\s+", " ", text).strip()


def cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace("*", "\\*")


def cell_help(text: str) -> str:
    """Help text in a table cell: Markdown links (made here) kept, everything else escaped."""
    parts = re.split(r"(\[[^\]]+\]\([^)]+\))", text)
    return "".join(p if i % 2 else cell(p) for i, p in enumerate(parts))


def symbol(text: str) -> str:
    """A one-letter comment (``d``, ``p``, ``T``) is the symbol of the model reference's notation."""
    if re.fullmatch(r"[A-Za-z]", text) and (ROOT / "docs" / "model-reference.md").exists():
        return f"`{text}` in the [model reference's notation](model-reference.md#notation-and-release-sizes)"
    return text


def code(text: str) -> str:
    text = text.replace("|", "\\|")
    return f"``{text}``" if "`" in text else f"`{text}`"


# --- comments of a class's fields (and of an Enum's members) ------------------------------------


def field_comments(cls: type) -> dict[str, str]:
    """name -> help: the full-line comments directly above the name's assignment, then the comment on
    its line(s), from the class's own source (none for a class made without a class statement)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except OSError:
        return {}
    lines = source.splitlines()
    own_line, trailing = {}, {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row = tok.start[0]
            text = tok.string.lstrip("#").strip()
            if lines[row - 1][: tok.start[1]].strip():
                trailing[row] = text
            else:
                own_line[row] = text
    body = ast.parse(source).body[0].body
    result = {}
    group, last_row = "", 0  # a comment block above a run of fields without comments speaks for all of them
    for node in body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            name = node.target.id
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
        else:
            continue
        above, row = [], node.lineno - 1
        while row in own_line:
            above.insert(0, own_line[row])
            row -= 1
        after = [trailing[r] for r in range(node.lineno, node.end_lineno + 1) if r in trailing]
        if above:
            group = " ".join(above) if not after else ""
        elif after or node.lineno != last_row + 1:
            group = ""
        last_row = node.end_lineno
        if above and after:
            text = " ".join(above) + "; " + " ".join(after)
        else:
            text = " ".join(above + after) or group
        result[name] = symbol(clean(text))
    return result


def _defining_class(cls: type, name: str) -> type:
    for klass in cls.__mro__:
        if name in klass.__dict__.get("__annotations__", {}):
            return klass
    return cls


def _doc(cls: type) -> str:
    doc = inspect.cleandoc(cls.__dict__.get("__doc__") or "")  # the class's own, not an inherited one
    if not doc or doc.startswith(cls.__name__ + "("):  # dataclass's generated signature
        return ""
    return clean(" ".join(doc.split("\n\n")[0].split()))


def _where(obj) -> str:
    path = Path(inspect.getsourcefile(sys.modules[obj.__module__])).resolve().relative_to(ROOT)
    return f"`{path.as_posix()}` (`{obj.__name__}`)"


# --- types and defaults ----------------------------------------------------------------------------


def _strip_optional(tp):
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return tp, False


def type_name(tp) -> str:
    inner, optional = _strip_optional(tp)
    origin, args = typing.get_origin(inner), typing.get_args(inner)
    if inner is typing.Any:
        name = "any"
    elif isinstance(inner, type) and issubclass(inner, enum.Enum):
        name = "choice"
    elif dataclasses.is_dataclass(inner):
        name = "section"
    elif origin in (list, typing.List):
        name = f"list[{type_name(args[0])}]" if args else "list"
    elif origin in (dict, typing.Dict):
        name = f"dict[{', '.join(type_name(a) for a in args)}]" if args else "dict"
    elif isinstance(inner, type):
        name = inner.__name__
    else:
        name = str(inner)
    return name + (" \\| null" if optional else "")


def yaml_value(value) -> str:
    if value is dataclasses.MISSING or value == "???":
        return "???"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {yaml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def default_of(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


# --- the dataclass sections ------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    key: str
    type: str
    default: str
    help: str
    owner: type


@dataclasses.dataclass
class Section:
    prefix: str  # "" for the top level, else "data." etc.
    cls: type
    rows: list[Row]


def anchor(title: str) -> str:
    """The id MkDocs gives a heading (the toc extension's default slugify)."""
    text = re.sub(r"[^\w\s-]", "", title.replace("`", "")).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


ENTRIES = {"": ("panda train", ""), "evaluate": ("panda evaluate", " (evaluate)")}


def section_title(prefix: str, entry: str) -> str:
    """The heading of a section: unique over the page, so each has its own anchor."""
    command, suffix = ENTRIES[entry]
    return f"Top level (`{command}`)" if not prefix else f"`{prefix.rstrip('.')}`{suffix}"


def _see(help_text: str, key: str, entry: str) -> str:
    """A nested section's row: its help (if any), then a pointer to its table below."""
    pointer = f"see [`{key}`](#{anchor(section_title(key + '.', entry))})"
    return f"{help_text.rstrip('.')}; {pointer}" if help_text else pointer[0].upper() + pointer[1:]


def walk(cls: type, prefix: str, sections: list[Section], choices: dict[type, list[str]], entry: str = "") -> None:
    hints = typing.get_type_hints(cls)
    section = Section(prefix, cls, [])
    sections.append(section)
    nested = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner, _ = _strip_optional(tp)
        owner = _defining_class(cls, f.name)
        help_text = field_comments(owner).get(f.name, "")
        default = default_of(f)
        key = prefix + f.name
        if isinstance(inner, type) and issubclass(inner, enum.Enum):
            choices.setdefault(inner, []).append((key, anchor(section_title(prefix, entry))))
            help_text = (help_text.rstrip(".") + ". " if help_text else "") + "Options: " + ", ".join(
                f"`{m.value}`" for m in inner) + "."
        origin, args = typing.get_origin(inner), typing.get_args(inner)
        if dataclasses.is_dataclass(inner):
            shown = "null" if default is None else "—"
            nested.append((inner, key + "."))
            help_text = _see(help_text, key, entry)
        elif origin in (list, typing.List) and args and dataclasses.is_dataclass(args[0]):
            shown = yaml_value([] if default is dataclasses.MISSING else default)
            nested.append((args[0], key + ".<i>."))
            help_text = _see(help_text, key + ".<i>", entry)
        elif origin in (dict, typing.Dict) and len(args) == 2 and dataclasses.is_dataclass(args[1]):
            shown = yaml_value(default)
            nested.append((args[1], key + ".<name>."))
            help_text = _see(help_text, key + ".<name>", entry)
        else:
            shown = yaml_value(default)
        section.rows.append(Row(key, type_name(tp), shown, help_text, owner))
    for inner, sub in nested:
        walk(inner, sub, sections, choices, entry)


def render_section(section: Section, title: str) -> list[str]:
    out = [f"### {title}", ""]
    doc = _doc(section.cls)
    if doc:
        out += [cell(doc).replace("\\*", "*"), ""]
    out += [f"Defined in {_where(section.cls)}."
            + ("" if all(r.owner is section.cls for r in section.rows) else
               " Inherited keys: " + ", ".join(sorted({_where(r.owner) for r in section.rows
                                                       if r.owner is not section.cls})) + "."), ""]
    out += ["| key | type | default | help |", "|---|---|---|---|"]
    for r in section.rows:
        shown = r.default if r.default == "—" else code(r.default)
        out.append(f"| {code(r.key)} | {r.type} | {shown} | {cell_help(r.help)} |")
    return out + [""]


def missing_help() -> list[str]:
    """Keys of the dataclasses in panda/config.py without help text (nested sections excepted: their
    class docstring says what they are)."""
    from panda.config import EvaluateConfig, TrainConfig

    found = []
    for root, label in ((TrainConfig, "train"), (EvaluateConfig, "evaluate")):
        sections: list[Section] = []
        walk(root, "", sections, {}, "" if root is TrainConfig else "evaluate")
        for s in sections:
            found += [f"{label}: {r.key} ({r.owner.__name__})" for r in s.rows
                      if r.owner.__module__ == "panda.config" and not r.help and not r.type.startswith("section")]
    return found


# --- config groups -----------------------------------------------------------------------------------


def _yaml_comment_lead(text: str) -> tuple[str, str]:
    """(package, first sentence of the leading comment) of a config file."""
    package, lead = "", []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        body = line[1:]
        if body.strip().startswith("@package"):
            package = body.strip().split(None, 1)[1]
            continue
        if body.startswith("   ") or not body.strip():  # an example command or a blank line ends the lead
            if lead:
                break
            continue
        lead.append(body.strip())
    sentence = clean(first_sentence(" ".join(lead)))
    return package, sentence + ("." if sentence and sentence[-1] not in ".?!" else "")


def first_sentence(text: str) -> str:
    """Up to the first full stop outside parentheses (not an abbreviation's); a sentence that
    introduces an example ("...written once by:") ends without its colon and dangling word."""
    depth = 0
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if ch == "." and depth <= 0 and (i + 1 == len(text) or text[i + 1] == " ") \
                and not re.search(r"(?:\be\.g|\bi\.e|\betc|\bvs)$", text[:i]):
            return text[: i + 1]
    text = text.strip()
    if text.startswith("(") and text.endswith(")"):
        return ""  # only a note of which defaults apply
    if text.endswith(":"):
        text = re.sub(r"\s+(?:by|with|as|like|e\.g\.)$", "", text[:-1].rstrip()) + "."
    return text


def _flatten(node, prefix: str) -> list[str]:
    if isinstance(node, dict):
        out = []
        for k, v in node.items():
            out += _flatten(v, f"{prefix}{k}.")
        return out or [f"{prefix[:-1]}={{}}"]
    if isinstance(node, list) and any(isinstance(v, dict) for v in node):
        out = []
        for i, v in enumerate(node):
            out += _flatten(v, f"{prefix}{i}.")
        return out
    return [f"{prefix[:-1]}={yaml_value(node)}"]


def group_options(conf: Path) -> dict[str, list[tuple[str, str, list[str], list[str]]]]:
    """group -> [(option, description, builds on, keys set)] for every YAML under conf/<group>/."""
    import yaml

    groups: dict[str, list] = {}
    for path in sorted(conf.rglob("*.yaml")):
        rel = path.relative_to(conf)
        if len(rel.parts) == 1:
            continue  # the entry configs
        if rel.parts[0] == "hydra":
            group, option = "/".join(rel.parts[:2]), "/".join(rel.parts[2:])[: -len(".yaml")]
        else:
            group, option = rel.parts[0], "/".join(rel.parts[1:])[: -len(".yaml")]
        text = path.read_text()
        package, lead = _yaml_comment_lead(text)
        data = yaml.safe_load(text) or {}
        defaults = []
        for entry in data.pop("defaults", []) or []:
            if isinstance(entry, dict):
                defaults += [f"{k.replace('override ', '').lstrip('/').split('@')[0]}={v}" for k, v in entry.items()]
            elif entry != "_self_":
                defaults.append(str(entry))
        if package == "_global_":
            prefix = ""
        elif package:
            prefix = package + "."
        else:
            prefix = group.replace("/", ".") + "."
        sets = []
        for key, value in data.items():
            sets += _flatten(value, f"{prefix}{key}.")
        groups.setdefault(group, []).append((option, lead, defaults, sets))
    return groups


def entry_defaults(path: Path) -> dict[str, str]:
    import yaml

    out = {}
    for entry in yaml.safe_load(path.read_text()).get("defaults", []):
        if isinstance(entry, dict):
            for k, v in entry.items():
                out[k] = yaml_value(v)
    return out


def render_groups(conf: Path) -> list[str]:
    train, evaluate = entry_defaults(conf / "train.yaml"), entry_defaults(conf / "evaluate.yaml")
    out = ["## Config groups", "",
           "Pick an option with `GROUP=OPTION` on the command line (`data=valley`, `experiment=ablation/no_fsra`). "
           "An option sets only the keys listed; everything else keeps the schema default above. "
           "The default option of each group is in bold; `null` means the group is off unless chosen.", ""]
    for group, options in group_options(conf).items():
        used = [name for name, entry in (("train", train), ("evaluate", evaluate)) if group in entry]
        where = (" and ".join(f"`conf/{u}.yaml`" for u in used) if used else "chosen on the command line")
        default = next((entry[group] for entry in (train, evaluate) if group in entry), None)
        out += [f"### Group `{group}`", "",
                f"Folder `conf/{group}/`; used by {where}"
                + (f"; default `{default}`" if default is not None else "") + ".", "",
                "| option | what | sets |", "|---|---|---|"]
        defaults = {d.strip("[]") for d in (default or "").split(", ")}
        for option, lead, builds_on, sets in options:
            name = f"**`{option}`**" if option in defaults else f"`{option}`"
            what = cell(lead)
            if builds_on:
                what += (" " if what else "") + "Builds on " + ", ".join(code(b) for b in builds_on) + "."
            shown = "<br>".join(code(s) for s in sets) if sets else "nothing (the defaults)"
            out.append(f"| {name} | {what} | {shown} |")
        out.append("")
    return out


# --- the page ------------------------------------------------------------------------------------------


def render_choices(choices: dict[type, list[str]]) -> list[str]:
    out = ["## Choices", "",
           "A key typed `choice` takes one of these values; any other value stops the run at composition, "
           "naming the key and its options.", ""]
    for enum_cls in sorted(choices, key=lambda c: c.__name__):
        comments = field_comments(enum_cls)
        doc = _doc(enum_cls)
        out += [f"### `{enum_cls.__name__}`", ""]
        if doc:
            out += [cell(doc).replace("\\*", "*"), ""]
        keys = ", ".join(f"[`{k}`](#{a})" for k, a in dict.fromkeys(choices[enum_cls]))
        out += [f"Defined in {_where(enum_cls)}; the type of {keys}.", "", "| value | meaning |", "|---|---|"]
        for member in enum_cls:
            out.append(f"| `{member.value}` | {cell(comments.get(member.name, ''))} |")
        out.append("")
    return out


def render() -> str:
    from panda.config import EvaluateConfig, TrainConfig

    choices: dict[type, list[str]] = {}
    train_sections: list[Section] = []
    walk(TrainConfig, "", train_sections, choices)
    eval_sections: list[Section] = []
    walk(EvaluateConfig, "", eval_sections, choices, "evaluate")

    out = [
        "<!-- GENERATED by docs/gen_config_reference.py from the config dataclasses and conf/: do not edit. -->",
        f"<!-- Regenerate: {COMMAND} -->",
        "",
        "# Configuration reference",
        "",
        "Every key `panda train` (`python train.py`) and `panda evaluate` (`python evaluate.py`) accept, with its "
        "type, default and help, generated from the typed schemas (`panda/config.py` and the dataclasses it "
        "points to) and from the config groups in `conf/`. Set a key on the command line as `key=value` "
        "(`data.batch_size=8`, `'llm.lora.target_modules=[q_proj,v_proj]'`); a key the schema lacks, a wrong "
        "type or an unknown choice stops the run before anything is written, naming the key.",
        "",
        "`???` marks a required key (no default); `null` is Python's `None`. "
        "For what the values mean in practice see [Concepts](concepts.md), [Data](data.md) and "
        "[Train and scale](train-and-scale.md).",
        "",
        "## Training keys (`TrainConfig`)",
        "",
        "Composed by `conf/train.yaml` on the schema `panda_train`.",
        "",
    ]
    for s in train_sections:
        out += render_section(s, section_title(s.prefix, ""))
    out += ["## Evaluation keys (`EvaluateConfig`)", "",
            "Composed by `conf/evaluate.yaml` on the schema `panda_evaluate`. Benchmarks are a map: "
            "`benchmark=[msvd_qa,vcgbench]` picks files of `conf/benchmark/`, each under its own name "
            "(`benchmark.msvd_qa.root=...`).", ""]
    for s in eval_sections:
        out += render_section(s, section_title(s.prefix, "evaluate"))
    out += render_choices(choices)
    out += render_groups(ROOT / "conf")
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not PAGE.exists() or PAGE.read_text() != text:
            print(f"{PAGE.relative_to(ROOT)} is out of date; regenerate it: {COMMAND}", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text)
    print(f"wrote {PAGE.relative_to(ROOT)} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
