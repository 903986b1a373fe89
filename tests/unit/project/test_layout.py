"""The package's shape: subpackages import each other without cycles, and modules stay small."""
import ast
import pathlib

PKG = pathlib.Path(__file__).resolve().parents[3] / "vffn_jax"
MAX_LINES = 550  # "no module over ~500 lines": split a module before it grows a second responsibility


def _unit(module: str) -> str:
    """The subpackage (or top-level module) that `vffn_jax.a.b` belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _imports(path: pathlib.Path) -> set[str]:
    """Every vffn_jax module a file imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vffn_jax"):
            if node.module == "vffn_jax":
                out.update(f"vffn_jax.{a.name}" for a in node.names)
            else:
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("vffn_jax"))
    return out


def unit_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        mod = ".".join(path.relative_to(PKG.parent).with_suffix("").parts)
        src = _unit(mod.removesuffix(".__init__"))
        graph.setdefault(src, set()).update(_unit(m) for m in _imports(path) if _unit(m) != src)
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_no_import_cycles_between_subpackages():
    graph = unit_graph()
    assert {"model", "parallel", "data", "checkpoint", "train", "infer", "evals", "perf", "study"} <= set(graph)
    cycle = _find_cycle(graph)
    assert cycle is None, f"import cycle between subpackages: {' -> '.join(cycle)}"


def test_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_modules_stay_small():
    big = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines (split them by responsibility): {big}"
