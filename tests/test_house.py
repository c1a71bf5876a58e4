"""The house rules that keep AutoSeg easy to walk: command lines only in ``cli/``, no library module importing them,
no import cycles between modules, no file past ~450 lines of code."""

import ast
import io
import tokenize
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "autoseg"
MAX_CODE_LINES = 450
DATA_TABLES = {"data/classes.py"}  # tables of class names (data, not code)


def modules() -> dict[str, Path]:
    return {
        ".".join(("autoseg", *p.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__"): p
        for p in PACKAGE.rglob("*.py")
    }


def imported(path: Path, top_level_only: bool) -> set[str]:
    """The autoseg modules ``path`` imports (``top_level_only``: not those imported inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("autoseg"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("autoseg"))
    return found


def test_no_library_module_imports_the_command_lines():
    offenders = {
        name: sorted(
            i for i in imported(path, top_level_only=False) if i == "autoseg.cli" or i.startswith("autoseg.cli.")
        )
        for name, path in modules().items()
        if not name.startswith("autoseg.cli") and path.name != "__main__.py"  # `python -m` shims are entry points
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_import_cycles_between_modules_at_import_time():
    mods = modules()
    graph = {
        name: {i for i in imported(path, top_level_only=True) if i in mods and i != name} for name, path in mods.items()
    }
    cycles, done = [], set()

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt in path:  # back to a module still being imported
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in done:
                visit(nxt, [*path, nxt])
        done.add(node)

    for name in sorted(graph):
        if name not in done:
            visit(name, [name])
    assert cycles == []


def code_lines(path: Path) -> int:
    """Lines holding code: not blank, not comments, not docstrings."""
    source = path.read_text(encoding="utf-8")
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            lines.update(n for n in range(tok.start[0], tok.end[0] + 1) if n not in docstrings)
    return len(lines)


def test_no_file_is_past_450_lines_of_code():
    sizes = {
        p.relative_to(PACKAGE).as_posix(): code_lines(p)
        for p in PACKAGE.rglob("*.py")
        if p.relative_to(PACKAGE).as_posix() not in DATA_TABLES
    }
    assert {k: v for k, v in sizes.items() if v > MAX_CODE_LINES} == {}
    assert 50 < sizes["pipeline.py"] < MAX_CODE_LINES  # the count counts something
