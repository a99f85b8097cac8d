"""The shape docs/ARCHITECTURE.md promises, checked on the source: no import circle, no source file
over 450 lines, family names tested only in ``smpo.models`` and method names only in the method
table and the losses."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_LINES = 450
FAMILY_NAMES = {"sd15", "sdxl", "sd3", "flux"}
METHOD_NAMES = {"smpo", "dpo", "kto", "mapo", "sft"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted((SRC / "smpo").rglob("*.py")):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every module of smpo that ``name`` imports (lazy and TYPE_CHECKING imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in names:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                out.add(target)
    return out


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (a package importing its own submodules is its face, not a cycle)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + "."):
                continue  # the package's face
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_no_import_circle():
    graph = {name: _imports(name, path) for name, path in MODULES.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_finds_a_planted_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"p": {"p.x"}, "p.x": {"p"}}) is None


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_source_file_over_the_limit(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name]} has {lines} lines"


def _compared_strings(path: Path) -> list[tuple[int, str]]:
    """String literals a module compares with (``==``, ``!=``, ``in``, ``not in``, ``match`` cases)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        operands: list[ast.AST] = []
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
        elif isinstance(node, ast.MatchValue):
            operands = [node.value]
        for operand in operands:
            items = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
            found += [(node.lineno, item.value) for item in items
                      if isinstance(item, ast.Constant) and isinstance(item.value, str)]
    return found


def test_only_the_model_layer_tests_a_family_name():
    offenders = [f"{path.relative_to(SRC)}:{line} {value!r}" for name, path in MODULES.items()
                 if not name.startswith("smpo.models") for line, value in _compared_strings(path)
                 if value in FAMILY_NAMES]
    assert not offenders, offenders


def test_only_the_method_table_and_the_losses_test_a_method_name():
    allowed = {"smpo.methods", "smpo.losses"}
    offenders = [f"{path.relative_to(SRC)}:{line} {value!r}" for name, path in MODULES.items()
                 if name not in allowed for line, value in _compared_strings(path) if value in METHOD_NAMES]
    assert not offenders, offenders


def test_the_string_finder_sees_comparisons_and_memberships():
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write('x = "sd15"\nif x == "sdxl" or x in ("flux", "other"):\n    pass\nprint("sd3")\n')
    assert sorted(v for _, v in _compared_strings(Path(f.name))) == ["flux", "other", "sdxl"]
