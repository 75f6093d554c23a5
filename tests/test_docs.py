"""Every citation in the package's docstrings and comments resolves inside the repository: a ``docs/….md`` (or
``data/README.md``) file that exists, a ``§N.M`` section heading that exists in it, and every dotted
``pytest_gpumem.…`` name a module or a name defined in one. (The research notes the code cites live in docs/.)"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pytest_gpumem"
DOC_REFERENCE = re.compile(r"(?<![\w/.-])((?:[\w-]+/)*[\w-]+\.md)\b")
SECTION = re.compile(r"§\s*(\d+(?:\.\d+)*)")
DOTTED = re.compile(r"\bpytest_gpumem(?:\.\w+)+")


def prose(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every docstring and comment of a module."""
    source = path.read_text(encoding="utf-8")
    found = [(token.start[0], token.string) for token in tokenize.generate_tokens(io.StringIO(source).readline)
             if token.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            docstring = ast.get_docstring(node, clean=False)
            if docstring:
                start = node.body[0].lineno
                found += [(start + offset, line) for offset, line in enumerate(docstring.splitlines())]
    return found


def headings(doc: Path) -> set[str]:
    """Section numbers of a Markdown file's headings: ``## 2.`` → "2", ``### 2.1 …`` → "2.1"."""
    numbers = set()
    for line in doc.read_text(encoding="utf-8").splitlines():
        match = re.match(r"#+\s+(\d+(?:\.\d+)*)\.?\s", line)
        if match:
            numbers.add(match.group(1))
    return numbers


def resolve(reference: str) -> Path | None:
    if reference.startswith("docs/"):
        return ROOT / reference
    if reference == "data/README.md":
        return PACKAGE / "data" / "README.md"
    if reference == "README.md":
        return ROOT / "README.md"
    return None


def _where(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def citation_problems(files: list[Path]) -> list[str]:
    problems = []
    for path in files:
        where = _where(path)
        for line_number, text in prose(path):
            for match in DOC_REFERENCE.finditer(text):
                reference = match.group(1)
                target = resolve(reference)
                if target is None or not target.is_file():
                    problems.append(f"{where}:{line_number}: {reference} is not a file of the repository")
                    continue
                clause = re.split(r"[);]", text[match.end():], maxsplit=1)[0]
                for section in SECTION.findall(clause):
                    if section not in headings(target):
                        problems.append(f"{where}:{line_number}: {reference} has no section {section}")
    return problems


def _defined(module: Path, names: list[str]) -> bool:
    """Whether ``names`` (a top-level name, then attributes of a class) are defined in ``module``."""
    body = ast.parse(module.read_text(encoding="utf-8")).body
    for name in names:
        defined = {}
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined[node.name] = node
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                defined.update({t.id: None for t in targets if isinstance(t, ast.Name)})
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                defined.update({(a.asname or a.name).split(".")[0]: None for a in node.names})
        if name not in defined:
            return False
        node = defined[name]
        body = node.body if isinstance(node, ast.ClassDef) else []
    return True


def dotted_problems(files: list[Path]) -> list[str]:
    problems = []
    for path in files:
        for line_number, text in prose(path):
            for reference in DOTTED.findall(text):
                parts = reference.split(".")
                for split in range(len(parts), 0, -1):  # the longest prefix that is a module
                    base = ROOT.joinpath(*parts[:split])
                    module = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
                    if module.is_file():
                        if not _defined(module, parts[split:]):
                            problems.append(f"{_where(path)}:{line_number}: {reference} does not resolve")
                        break
                else:
                    problems.append(f"{_where(path)}:{line_number}: {reference} does not resolve")
    return problems


def test_every_doc_citation_resolves():
    files = sorted(PACKAGE.rglob("*.py"))
    assert citation_problems(files) == []
    cited = {m.group(1) for path in files for _, text in prose(path) for m in DOC_REFERENCE.finditer(text)}
    assert {"docs/memory-model.md", "docs/accuracy.md"} <= cited  # the test sees the citations it checks


def test_every_dotted_name_in_a_docstring_resolves():
    assert dotted_problems(sorted(PACKAGE.rglob("*.py"))) == []


def test_the_checkers_catch_broken_citations(tmp_path):
    bad = tmp_path / "planted.py"
    text = ('"""Cites shared/docs/memory-model.md, docs/memory-model.md §9 and §2.1, docs/nowhere.md, and\n'
            'pytest_gpumem.marks.judged_peak and pytest_gpumem.record.no_such_name."""\n'
            "# a comment citing docs/memory-model.md §3.1 is fine\n")
    bad.write_text(text, encoding="utf-8")
    problems = citation_problems([bad]) + dotted_problems([bad])
    joined = "\n".join(problems)
    assert "shared/docs/memory-model.md is not a file" in joined
    assert "docs/memory-model.md has no section 9" in joined and "section 2.1" not in joined
    assert "docs/nowhere.md is not a file" in joined
    assert "pytest_gpumem.marks.judged_peak does not resolve" in joined
    assert "pytest_gpumem.record.no_such_name does not resolve" in joined
    assert "3.1" not in joined
    assert len(problems) == 5
