"""README.md and docs/*.md name only things that exist.

Parsed, never imported (no network, no heavy imports, well under a second):
- every repo path in backticks (inline or fenced code) that starts with dpo_pipeline/, stages/, tools/,
  bench/, tests/, recipes/, docs/ or data/raw/ and is a `.py`, `.yaml` or `.md` file or a folder exists; a
  `::name` after a `.py` path (a test) is a top-level def or class of that file; patterns with `*`, `{...}` or
  `<...>` placeholders are skipped;
- every dotted name in backticks starting with `dpo_pipeline.`, `stages.`, `tools.` or `bench.` resolves: its
  longest prefix that is a module file (x/y.py or x/y/__init__.py) exists, and the rest, if any, is a
  top-level def, class or assignment of that module (read with `ast`), or a class's attribute after it;
- every relative Markdown link points to an existing file (and an existing heading, for `#anchors` into .md
  files), and the README links every docs page.
Each failure lists the bad name with the file it appears in.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOCS = REPO / "docs"

PATH_ROOTS = ("dpo_pipeline", "stages", "tools", "bench", "tests", "recipes", "docs", "data/raw")
CHECKED_SUFFIXES = (".py", ".yaml", ".md")
DOTTED_ROOTS = ("dpo_pipeline", "stages", "tools", "bench")
PLACEHOLDER = re.compile(r"[*<>{}]")

FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})[^\n]*\n(.*?)^[ \t]*\1[ \t]*$", re.M | re.S)
INLINE_CODE = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)
LINK = re.compile(r"\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^()\s<>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
PATH_TOKEN = re.compile(
    r"(?<![\w./-])((?:" + "|".join(re.escape(r) for r in PATH_ROOTS) + r")/[\w./*<>{}-]*)(?:::([\w.-]+))?"
)
DOTTED = re.compile(r"(?<![\w./-])((?:" + "|".join(DOTTED_ROOTS) + r")(?:\.[A-Za-z_]\w*)+)")
HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.*?)[ \t]*#*[ \t]*$", re.M)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def doc_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def code_spans(text: str) -> list[str]:
    """The contents of fenced code blocks and inline code spans, in that order."""
    spans = [m.group(2) for m in FENCE.finditer(text)]
    prose = FENCE.sub("", text)
    spans += [m.group(2) for m in INLINE_CODE.finditer(prose)]
    return spans


def without_code(text: str) -> str:
    return INLINE_CODE.sub(" ", FENCE.sub("", text))


def _target_names(target: ast.expr):
    if isinstance(target, ast.Name):
        yield target.id
    elif isinstance(target, ast.Tuple | ast.List):
        for element in target.elts:
            yield from _target_names(element)
    elif isinstance(target, ast.Starred):
        yield from _target_names(target.value)


def _bound_names(body: list[ast.stmt]):
    """Names a def, class or assignment binds at this level (inside top-level if / try / with blocks too)."""
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            yield node.name, node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                for name in _target_names(target):
                    yield name, node
        elif isinstance(node, ast.AnnAssign | ast.AugAssign):
            for name in _target_names(node.target):
                yield name, node
        elif isinstance(node, ast.If | ast.While | ast.For):
            yield from _bound_names(node.body)
            yield from _bound_names(node.orelse)
        elif isinstance(node, ast.With):
            yield from _bound_names(node.body)
        elif isinstance(node, ast.Try | ast.TryStar):
            yield from _bound_names(node.body)
            for handler in node.handlers:
                yield from _bound_names(handler.body)
            yield from _bound_names(node.orelse)
            yield from _bound_names(node.finalbody)


@cache
def top_level(module_file: Path) -> dict[str, ast.stmt]:
    tree = ast.parse(module_file.read_text(encoding="utf-8"), filename=str(module_file))
    return dict(_bound_names(tree.body))


def module_file(parts: list[str]) -> Path | None:
    base = REPO.joinpath(*parts)
    for candidate in (base.parent / f"{base.name}.py", base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def dotted_problem(dotted: str) -> str | None:
    """None when `dotted` resolves, else why not."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        found = module_file(parts[:cut])
        if found is None:
            continue
        rest = parts[cut:]
        if not rest:
            return None
        names = top_level(found)
        node = names.get(rest[0])
        if node is None:
            if found.name == "__init__.py":
                module = f"{rel(found.parent)}/{rest[0]}.py"
                return f"no module {module}, no top-level name {rest[0]!r} in {rel(found)}"
            return f"no top-level def, class or assignment {rest[0]!r} in {rel(found)}"
        if len(rest) == 1:
            return None
        if isinstance(node, ast.ClassDef) and len(rest) == 2:
            if rest[1] in dict(_bound_names(node.body)):
                return None
            return f"class {rest[0]} in {rel(found)} defines no {rest[1]!r}"
        return f"{'.'.join(rest)!r} is not a name in {rel(found)}"
    return "no such module file"


def path_problem(token: str, test_name: str | None) -> str | None:
    """None when the path exists (or is not a checked kind of path), else why not."""
    if token.endswith("..."):
        return None
    token = token.rstrip(".,;:")
    if PLACEHOLDER.search(token):
        return None
    last = token.rstrip("/").rsplit("/", 1)[-1]
    target = REPO / token
    if token.endswith("/") or "." not in last:
        return None if target.is_dir() else "no such folder"
    if Path(last).suffix not in CHECKED_SUFFIXES:
        return None
    if not target.is_file():
        return "no such file"
    if test_name and target.suffix == ".py" and not test_name.endswith("..."):
        name = test_name.split("[", 1)[0]
        if name not in top_level(target):
            return f"no top-level def or class {name!r} in it"
    return None


def slug_set(md_file: Path) -> set[str]:
    """GitHub's heading anchors for a Markdown file (headings in fenced code do not count)."""
    seen: dict[str, int] = {}
    slugs = set()
    for match in HEADING.finditer(FENCE.sub("", md_file.read_text(encoding="utf-8"))):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match.group(1)).strip().lower()
        slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        slugs.add(slug if count == 0 else f"{slug}-{count}")
    return slugs


def link_problem(md_file: Path, target: str) -> str | None:
    if SCHEME.match(target) or target.startswith("/"):
        return None
    path_part, _, anchor = target.partition("#")
    resolved = (md_file.parent / path_part).resolve() if path_part else md_file
    if path_part:
        if not resolved.is_relative_to(REPO):
            return "points outside the repository"
        if not resolved.exists():
            return "no such file"
    if anchor and resolved.is_file() and resolved.suffix == ".md" and anchor not in slug_set(resolved):
        return f"no heading #{anchor} in {rel(resolved)}"
    return None


def report(bad: list[str]) -> str:
    return f"{len(bad)} stale name(s) in the docs:\n" + "\n".join(bad)


def test_the_docs_exist():
    assert README.is_file()
    assert list(DOCS.glob("*.md")), "docs/ has no pages"


def test_every_path_in_the_docs_exists():
    bad = []
    for md in doc_files():
        for span in code_spans(md.read_text(encoding="utf-8")):
            for match in PATH_TOKEN.finditer(span):
                problem = path_problem(match.group(1), match.group(2))
                if problem:
                    named = match.group(1) + (f"::{match.group(2)}" if match.group(2) else "")
                    bad.append(f"{rel(md)}: `{named}`: {problem}")
    assert not bad, report(sorted(set(bad)))


def test_every_dotted_name_in_the_docs_resolves():
    bad = []
    for md in doc_files():
        for span in code_spans(md.read_text(encoding="utf-8")):
            for match in DOTTED.finditer(span):
                problem = dotted_problem(match.group(1))
                if problem:
                    bad.append(f"{rel(md)}: `{match.group(1)}`: {problem}")
    assert not bad, report(sorted(set(bad)))


def test_every_relative_link_in_the_docs_resolves():
    bad = []
    for md in doc_files():
        for match in LINK.finditer(without_code(md.read_text(encoding="utf-8"))):
            problem = link_problem(md, match.group(1))
            if problem:
                bad.append(f"{rel(md)}: link ({match.group(1)}): {problem}")
    assert not bad, report(sorted(set(bad)))


def test_the_readme_links_every_docs_page():
    linked = set()
    for match in LINK.finditer(without_code(README.read_text(encoding="utf-8"))):
        path_part = match.group(1).partition("#")[0]
        if path_part and not SCHEME.match(path_part):
            linked.add((REPO / path_part).resolve())
    pages = {page.resolve() for page in DOCS.glob("*.md")}
    missing = sorted(rel(page) for page in pages - linked)
    assert not missing, "README.md: no link to " + ", ".join(missing)
