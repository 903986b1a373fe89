"""The package's shape: an import only ever points down the layers (config < storage/rundir < parallel < model <
data < checkpoint < evals < train < study; the command lines on top), no cycles, no argument parser outside
vffn_jax/cli/, evaluation independent of training, and small modules.

Each subsystem's config section (`model/config.py`, `train/config.py`, `data/config.py`, `parallel/mesh.py`)
belongs to the config layer: it imports only the error types, and `config.py` composes them. `__main__.py`
files are `python -m` entry shims over vffn_jax/cli/ and belong to the command-line layer.
"""
import ast
import pathlib

PKG = pathlib.Path(__file__).resolve().parents[3] / "vffn_jax"
MAX_LINES = 550  # "no module over ~500 lines": split a module before it grows a second responsibility
SECTIONS = {"vffn_jax.model.config", "vffn_jax.train.config", "vffn_jax.data.config", "vffn_jax.parallel.mesh"}
# bottom to top; a unit may import units of its own layer or below
LAYERS = [
    {"errors", "platform"},
    {"config"},
    {"storage"},
    {"rundir", "depth_plot", "compile_cache"},
    {"parallel"},
    {"perf"},
    {"model"},
    {"infer"},
    {"data"},
    {"checkpoint"},
    {"evals", "hf", "serve"},
    {"train"},
    {"study"},
    {"testing"},
    {"cli"},
]
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def _module(path: pathlib.Path) -> str:
    return ".".join(path.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__")


def _unit(module: str) -> str:
    """The layer unit of `vffn_jax.a.b`: its subpackage or top-level module, "config" for a config section,
    "cli" for a `__main__` entry shim."""
    if module in SECTIONS:
        return "config"
    if module.endswith(".__main__"):
        return "cli"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _imports(path: pathlib.Path) -> set[str]:
    """Every vffn_jax module a file imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vffn_jax"):
            for a in node.names:
                full = f"{node.module}.{a.name}"
                # `from vffn_jax.model import config` imports the module vffn_jax.model.config
                out.add(full if node.module == "vffn_jax" or full in SECTIONS else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("vffn_jax"))
    return out


def import_edges() -> list[tuple[str, str, str]]:
    """(importing unit, imported unit, file) for every import between two units."""
    edges = []
    for path in PKG.rglob("*.py"):
        src = _unit(_module(path))
        edges += [(src, _unit(m), str(path.relative_to(PKG))) for m in _imports(path) if _unit(m) != src]
    return edges


def unit_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for src, dst, _ in import_edges():
        graph.setdefault(src, set()).add(dst)
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


def test_every_unit_has_a_layer():
    units = {_unit(_module(p)) for p in PKG.rglob("*.py")} - {"vffn_jax"}
    assert units <= set(LAYER), f"place these in LAYERS: {sorted(units - set(LAYER))}"


def test_imports_point_down_the_layers():
    upward = sorted({f"{f}: {src} -> {dst}" for src, dst, f in import_edges()
                     if src != "vffn_jax" and LAYER[dst] > LAYER[src]})
    assert not upward, "imports that point up the layers (move the code down, or the import up):\n" + "\n".join(upward)


def test_no_import_cycles_between_subpackages():
    graph = unit_graph()
    assert {"model", "parallel", "data", "checkpoint", "train", "infer", "evals", "perf", "study", "cli"} <= set(graph)
    cycle = _find_cycle(graph)
    assert cycle is None, f"import cycle between subpackages: {' -> '.join(cycle)}"


def test_evaluation_imports_nothing_from_training():
    assert not [f for src, dst, f in import_edges() if src == "evals" and dst == "train"]


def test_config_sections_import_only_the_errors():
    for name in SECTIONS:
        path = PKG.joinpath(*name.split(".")[1:]).with_suffix(".py")
        assert _imports(path) <= {"vffn_jax.errors"}, f"{path.relative_to(PKG)} imports {_imports(path)}"


def test_argument_parsers_only_in_the_command_line_layer():
    offenders = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py")
                 if p.parent.name != "cli" and "argparse" in {a.name for n in ast.walk(ast.parse(p.read_text()))
                                                              if isinstance(n, (ast.Import, ast.ImportFrom))
                                                              for a in ([ast.alias(n.module)] if isinstance(n, ast.ImportFrom) else n.names)}]
    assert not offenders, f"argparse outside vffn_jax/cli/: {offenders}"


def test_layer_and_cycle_checks_can_fail():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None
    assert LAYER["evals"] < LAYER["train"] < LAYER["cli"] and LAYER["config"] < LAYER["model"]
    assert _unit("vffn_jax.model.config") == "config" and _unit("vffn_jax.model.ffn") == "model"


def test_modules_stay_small():
    big = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines (split them by responsibility): {big}"


def test_config_module_is_composition_only():
    n = len((PKG / "config.py").read_text().splitlines())
    assert n <= 250, f"vffn_jax/config.py has {n} lines: section fields and checks belong beside their code"
