"""The repository cites only what it ships.

Every text file under ``panda/``, ``conf/``, ``docs/``, ``benchmarks/``, ``experiments/`` and
``tests/``, and ``README.md``, is read, and these are failures, listed as ``file:line``:

- a mention of a document users never get: the file names of the internal design notes (the STAB,
  training and architecture notes), a path into the shared folder beside the repository, or an
  issue number: the fact itself belongs in the text, or in ``docs/``;
- a repository path (``docs/...``, ``conf/...``, ``benchmarks/...``, ``experiments/...``,
  ``panda/...``, ``tests/...``) that does not exist: a file name with an extension, a folder with
  its trailing slash, or anything three levels deep; not a path under a git-ignored folder (a
  run's output, such as ``multirun/``), nor one inside a Markdown transcript (a ``text`` code block
  showing what a command printed);
- a citation ``docs/PAGE.md, "Heading"`` (the heading may start on the next line) or
  ``docs/PAGE.md#anchor`` whose heading or anchor is not on that page;
- a Markdown link in a ``.md`` file (``[text](page.md#anchor)``) whose file or anchor does not exist.
"""

from __future__ import annotations

import fnmatch
import os
import re
import tomllib
import unicodedata
from functools import lru_cache

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNED = ["panda", "conf", "docs", "benchmarks", "experiments", "tests", "README.md"]
THIS = os.path.relpath(os.path.abspath(__file__), REPO)
SKIPPED_DIRS = {"__pycache__", ".git", ".pytest_cache", ".mypy_cache", ".ruff_cache"}

# documents that do not ship: the design notes by name, the shared folder, issue numbers
OUTSIDE = re.compile(r"(?<![\w-])(?:stab|training|architecture)\.md\b"
                     r"|\.\./shared\b|(?<![\w-])shared/(?:design|notes)\b"
                     r"|\b[Ii]ssues? #?\d+")
# a repository path: one of the top-level folders, then path characters; it stops at anything a
# placeholder or pattern uses (<name>, *, {key}, ${interp}): `conf/experiment/<name>.yaml` checks
# `conf/experiment/`
PATH = re.compile(r"(?<![\w./\\-])((?:docs|conf|benchmarks|experiments|panda|tests)/[\w./+-]*[\w/])")
# a citation of a docs page's section: docs/page.md, "Heading"  or  docs/page.md#anchor; the heading
# may follow on the next line, after a comment's "#"
SECTION = re.compile(r'(docs/[\w./-]+\.md)(?:,\s*(?:#\s*)?"([^"\n]+)"|#([\w-]+))')
# a Markdown link or image target: [text](target) — the target without a title
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")
TRANSCRIPTS = {"text", "console", "output"}  # code blocks that show what a command printed


def slugify(heading: str) -> str:
    """The anchor MkDocs (Python-Markdown's toc extension, default settings) gives a heading."""
    parts = re.split(r"(`[^`]*`)", heading)
    text = "".join(part[1:-1] if part.startswith("`") else  # inline code keeps its text, <i> included
                   re.sub(r"<[^>]+>", "", re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", part))  # a link its text
                   for part in parts)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def headings_of(markdown: str) -> tuple[set[str], set[str]]:
    """(heading texts, anchors) of a Markdown text, outside fenced code; repeated anchors get
    ``_1``, ``_2`` ... as the toc extension numbers them."""
    texts, anchors, fenced = set(), set(), False
    for line in markdown.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if fenced or not match:
            continue
        heading = match.group(1)
        texts.add(heading)
        slug, n = slugify(heading), 0
        while (slug if not n else f"{slug}_{n}") in anchors:
            n += 1
        anchors.add(slug if not n else f"{slug}_{n}")
    return texts, anchors


@lru_cache(maxsize=None)
def headings_in(path: str) -> tuple[set[str], set[str]]:
    """Headings and anchors of the repository file ``path`` (empty when it cannot be read)."""
    try:
        with open(os.path.join(REPO, path), encoding="utf-8") as f:
            return headings_of(f.read())
    except (OSError, UnicodeDecodeError):
        return set(), set()


@lru_cache(maxsize=None)
def package_dirs() -> tuple[tuple[str, str], ...]:
    """pyproject.toml's ``[tool.setuptools.package-dir]`` as (path in the wheel, path in the
    repository): ``panda/conf`` is ``conf`` (the package ``panda.conf`` maps onto ``conf/``)."""
    try:
        with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
            mapping = tomllib.load(f).get("tool", {}).get("setuptools", {}).get("package-dir", {})
    except (OSError, tomllib.TOMLDecodeError):
        return ()
    return tuple((package.replace(".", "/"), folder.strip("/")) for package, folder in mapping.items() if package)


def exists(path: str) -> bool:
    """Whether ``path`` is in the repository, or is a file of an installed package that the
    repository maps from another folder (``panda/conf/train.yaml`` is ``conf/train.yaml``)."""
    if os.path.exists(os.path.join(REPO, path)):
        return True
    return any(os.path.exists(os.path.join(REPO, folder + path[len(package):]))
               for package, folder in package_dirs() if path == package or path.startswith(package + "/"))


@lru_cache(maxsize=None)
def ignored_patterns() -> tuple[str, ...]:
    """The .gitignore patterns (``multirun/``, ``outputs/`` ...): a path under one is a run's output,
    written by the command that names it, never part of the repository."""
    try:
        with open(os.path.join(REPO, ".gitignore"), encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return ()
    return tuple(line.strip().strip("/") for line in lines if line.strip() and not line.startswith(("#", "!")))


def is_cited_path(path: str) -> bool:
    """Whether ``path`` reads as a file or folder of the repository: a file name with an extension,
    a folder written with its trailing slash, or at least two levels deep (``panda/PIL``, a ratio's
    label, is not); a path under a git-ignored folder (a run's output) is not either."""
    parts = path.rstrip("/").split("/")
    if not ("." in parts[-1] or path.endswith("/") or len(parts) >= 3):
        return False
    return not any(fnmatch.fnmatch(part, pattern) for part in parts for pattern in ignored_patterns())


def problems_in(text: str, path: str) -> list[tuple[int, str]]:
    """(line, what is wrong) for every outside reference and every broken repository reference in
    ``text``, the content of the repository file ``path`` (relative links resolve against its folder)."""
    found = []
    markdown = path.endswith(".md")
    own_anchors = headings_of(text)[1] if markdown else set()
    fence = None  # the info string of the Markdown code block the line is in
    for number, line in enumerate(text.splitlines(), 1):
        opens = markdown and FENCE.match(line)
        if opens:
            fence = None if fence is not None else line.strip().lstrip("`~").strip()
        for match in OUTSIDE.finditer(line):
            found.append((number, f"cites {match.group(0)!r}, which does not ship: state the fact, or cite docs/"))
        missing = set()
        if fence not in TRANSCRIPTS:  # a transcript shows what a command printed, a missing file's name included
            missing = {m.group(1) for m in PATH.finditer(line) if is_cited_path(m.group(1)) and not exists(m.group(1))}
            found += [(number, f"{p} does not exist in the repository") for p in sorted(missing)]
        if markdown and fence is None and not opens:
            found += [(number, problem) for problem in _link_problems(line, path, own_anchors, missing)]
    for match in SECTION.finditer(text):
        page, heading, anchor = match.groups()
        if not exists(page):
            continue  # reported as a missing path
        number = text.count("\n", 0, match.start()) + 1
        texts, anchors = headings_in(page)
        if heading is not None and heading not in texts:
            found.append((number, f'{page} has no heading "{heading}"'))
        if anchor is not None and anchor not in anchors:
            found.append((number, f"{page} has no anchor #{anchor}"))
    return sorted(found, key=lambda item: item[0])


def _link_problems(line: str, path: str, own_anchors: set[str], reported: set[str]) -> list[str]:
    """Problems of the Markdown links on ``line`` of ``path``; a target already ``reported`` as a
    missing repository path is not reported twice."""
    out = []
    for match in LINK.finditer(line):
        target = match.group(1)
        if re.match(r"^[a-z][\w+.-]*:", target) or target.startswith("//"):
            continue  # http:, https:, mailto: ...
        file_part, _, anchor = target.partition("#")
        linked = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        if file_part and not exists(linked):
            if linked not in reported:
                out.append(f"link target {target} does not exist ({linked})")
            continue
        anchors = headings_in(linked)[1] if file_part else own_anchors
        if anchor and linked.endswith(".md") and anchor not in anchors:
            out.append(f"link target {target}: {linked} has no anchor #{anchor}")
    return out


def scanned_files() -> list[str]:
    files = []
    for top in SCANNED:
        if os.path.isfile(os.path.join(REPO, top)):
            files.append(top)
            continue
        for folder, dirs, names in os.walk(os.path.join(REPO, top)):
            dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS and not d.endswith(".egg-info"))
            files += [os.path.relpath(os.path.join(folder, name), REPO) for name in sorted(names)]
    return [f for f in files if f != THIS]


def read_text(path: str) -> str | None:
    """The file's text, or None for a binary file."""
    with open(os.path.join(REPO, path), "rb") as f:
        data = f.read()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def test_nothing_cites_a_document_that_does_not_ship_or_a_path_that_is_not_there():
    found = []
    for path in scanned_files():
        text = read_text(path)
        if text is not None:
            found += [f"{path}:{line}: {problem}" for line, problem in problems_in(text, path)]
    assert not found, "references to documents that do not ship, or to nothing:\n" + "\n".join(found)


def test_the_docs_pages_the_code_cites_exist():
    for page in ("model-reference", "recipe-reference", "fidelity", "code-layout"):
        assert exists(f"docs/{page}.md"), page


MD, ISSUE = ".md", "issue"


@pytest.mark.parametrize("text, expected", [
    ("see docs/nope.md for more", "docs/nope.md does not exist"),
    # the forbidden names are put together here, so that this file does not cite them itself
    ("# the design (stab" + MD + " §7)", "'stab" + MD + "'"),
    ("as training" + MD + " says", "'training" + MD + "'"),
    ("layers: see architecture" + MD, "'architecture" + MD + "'"),
    ("facts in ../" + "sha" + "red/de" + "sign/", "'../" + "sha" + "red'"),
    ("asked for by " + ISSUE + " 12", "'" + ISSUE + " 12'"),
    ("I" + ISSUE[1:] + " 17 asked the default", "'I" + ISSUE[1:] + " 17'"),
    ("conf/stab/nope.yaml sets it", "conf/stab/nope.yaml does not exist"),
    ("python benchmarks/nope.py", "benchmarks/nope.py does not exist"),
    ("experiments/no_such_study/README.md", "experiments/no_such_study/README.md does not exist"),
    ('(docs/model-reference.md, "No such heading")', 'docs/model-reference.md has no heading "No such heading"'),
    ('# a comment (docs/model-reference.md,\n#   "No such heading")', 'docs/model-reference.md has no heading'),
    ("docs/fidelity.md#no-such-anchor", "docs/fidelity.md has no anchor #no-such-anchor"),
])
def test_the_detector_reports_a_bad_reference(text, expected):
    problems = problems_in(f"x = 1\n{text}\n", "panda/probe.py")
    assert [line for line, _ in problems] == [2] and expected in problems[0][1], problems


@pytest.mark.parametrize("text", [
    "docs/fidelity.md and conf/stab/release.yaml and benchmarks/stab_reference.py",
    '(docs/model-reference.md, "Local spatial downsampling")',
    '(docs/recipe-reference.md,\n    "Evaluation") and # (docs/model-reference.md,\n# "Teachers")',
    "docs/fidelity.md#token-ids",
    "conf/experiment/<name>.yaml, experiments/<study>/README.md, panda/models/*.py",
    "https://github.com/example/panda/tests/nope.py and litdata's issues/775",
    "the design of STAB (docs/model-reference.md) and a model.md of your own",
    "hydra.sweep.dir=experiments/some_study/multirun  (a run's output: git-ignored)",
    "panda/PIL x1.8 (a ratio, not a path); panda/conf of an installed wheel",
    "the wheel holds panda/conf/train.yaml and panda/conf/experiment/ablation/no_fsra.yaml",
])
def test_the_detector_accepts_good_references(text):
    assert problems_in(text, "panda/probe.py") == []


def test_markdown_links_and_anchors_are_checked_relative_to_the_page():
    page = "docs/probe.md"
    good = "[fidelity](fidelity.md#token-ids) [here](#x) [site](https://example.org/a.md)\n\n# X\n"
    assert problems_in(good, page) == []
    bad = "[a](nope.md) [b](fidelity.md#nope) [c](#missing)\n```\n[d](not-checked-in-code.md)\n```\n# X\n"
    assert [p for _, p in problems_in(bad, page)] == [
        "link target nope.md does not exist (docs/nope.md)",
        "link target fidelity.md#nope: docs/fidelity.md has no anchor #nope",
        "link target #missing: docs/probe.md has no anchor #missing",
    ]


def test_a_transcript_in_markdown_may_name_a_missing_file_and_a_command_may_not():
    transcript = "```text\n$ python train.py experiment=nope\nno config conf/experiment/nope.yaml\n```\n"
    assert problems_in(transcript, "docs/probe.md") == []
    command = "```bash\npython benchmarks/nope.py\n```\n"
    assert problems_in(command, "docs/probe.md") == [(2, "benchmarks/nope.py does not exist in the repository")]


def test_anchors_follow_the_mkdocs_slug_rule():
    assert slugify("LSTE: local spatio-temporal encoding") == "lste-local-spatio-temporal-encoding"
    assert slugify("Table 11: long videos") == "table-11-long-videos"
    assert slugify("`panda.models`") == "pandamodels"
    assert slugify("`data.shards.<i>`") == "datashardsi" and slugify("a <b>bold</b> [link](x.md)") == "a-bold-link"
    assert headings_of("# A\n## A\n```\n# not a heading\n```\n")[1] == {"a", "a_1"}
