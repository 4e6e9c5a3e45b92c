"""The import graph of xrec_pl, data_modules and callbacks flows one way, read from the source with ``ast``.

Every import counts, function-level ones included. Three rules:

* no cycles between modules;
* no module imports one from a higher layer (the map below);
* no private name (``_x``) of one module is imported or read by another (``from m import _x``, ``m._x``);
* no private attribute of another object is read or written (``dm._rows``, ``trainer.datamodule._x``): only ``self``,
  ``cls`` and ``super()`` reach private members; a class offers what others need as public methods/properties.
  Third-party internals the project must touch are listed, with the reason, in ``FOREIGN_INTERNALS``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("xrec_pl", "data_modules", "callbacks")

# Lower numbers are lower layers; a module may import its own layer and the ones below. The longest matching prefix
# decides, except that "xrec_pl" names the package's __init__ alone: a new top-level module must be placed here.
# The base (errors, run_layout, utils, outputs, run_lock, error_lines) imports nothing above it and sits below all.
LAYERS: dict[str, int] = {
    "xrec_pl": 0,
    "xrec_pl.errors": 0,
    "xrec_pl.run_layout": 0,
    "xrec_pl.utils": 0,
    "xrec_pl.outputs": 0,
    "xrec_pl.run_lock": 0,
    "xrec_pl.error_lines": 0,
    "xrec_pl.config_files": 0,
    "xrec_pl.progress": 0,
    "xrec_pl.models": 1,
    "xrec_pl.data": 2,
    "xrec_pl.metrics": 2,
    "xrec_pl.run_plots": 2,
    "xrec_pl.lit": 3,
    "data_modules": 4,
    "callbacks": 4,
    "xrec_pl.loggers": 4,
    "xrec_pl.tools": 5,
    "xrec_pl.cli": 6,
}


EXACT = {"xrec_pl"}  # entries that name one module, never a prefix

# "module: expression" of private attributes of other libraries' objects that the project has to use
FOREIGN_INTERNALS = {
    "xrec_pl.data.pickles: palib._restore_array",  # pandas' own unpickling helper, allowed by the safe unpickler
    "xrec_pl.data.pickles: torch._utils",  # torch's tensor-rebuild helpers, allowed by the safe unpickler
    "xrec_pl.tools.bench.stage2_common: config._attn_implementation",  # the HF config's attention kernel switch
    "xrec_pl.tools.bench.stage2_reference: self.llm.config._attn_implementation",  # (same, read by the reference)
}
OWN = {"self", "cls", "super()"}  # the expressions that may reach private members


@dataclass
class Graph:
    """Modules (name -> source) and the imports between them."""

    sources: dict[str, str]
    edges: dict[str, set[str]] = field(default_factory=dict)
    private: list[str] = field(default_factory=list)  # "importer: module._name"


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _resolve(name: str, modules: set[str]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _absolute(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = importer.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def build_graph(sources: dict[str, str], packages: set[str] | None = None) -> Graph:
    """Parse every module's source and collect the project-internal imports.

    Args:
        sources: module name -> source text. A name that is also a prefix of other names is a package.
        packages: names of packages (``__init__`` modules); inferred from the names when None.
    """
    modules = set(sources)
    packages = packages if packages is not None else {m for m in modules if any(o.startswith(m + ".") for o in modules)}
    graph = Graph(sources)
    for importer, text in sources.items():
        targets: set[str] = set()
        aliases: dict[str, str] = {}  # local name -> project module it is bound to
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = _resolve(alias.name, modules)
                    if target:
                        targets.add(target)
                        if alias.asname:
                            aliases[alias.asname] = target
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(importer, importer in packages, node)
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    if full in modules:  # `from pkg import module`
                        targets.add(full)
                        aliases[alias.asname or alias.name] = full
                        continue
                    target = _resolve(base, modules)
                    if target:
                        targets.add(target)
                        if _is_private(alias.name) and target != importer:
                            graph.private.append(f"{importer}: {target}.{alias.name}")
        for node in ast.walk(ast.parse(text)):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and _is_private(node.attr)
                and aliases[node.value.id] != importer
            ):
                graph.private.append(f"{importer}: {aliases[node.value.id]}.{node.attr}")
        graph.edges[importer] = targets - {importer}
    return graph


def private_attribute_access(sources: dict[str, str]) -> list[str]:
    """Accesses ``expr._x`` where ``expr`` is not ``self``/``cls``/``super()``, as ``"module: expr._x"``.

    Module aliases are left to :func:`build_graph` (a module's private name); this catches an object's private
    member reached from outside its class, e.g. a callback reading ``trainer.datamodule._builder``.
    """
    found = []
    for module, text in sources.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Attribute) and _is_private(node.attr):
                base = ast.unparse(node.value)
                if base not in OWN:
                    found.append(f"{module}: {base}.{node.attr}")
    return sorted(set(found))


def layer_of(module: str, layers: dict[str, int]) -> int:
    """The layer of ``module``: the entry with the longest matching prefix."""
    matches = [p for p in layers if module == p or (p not in EXACT and module.startswith(p + "."))]
    if not matches:
        raise KeyError(f"{module}: no layer in the map; add it to LAYERS")
    return layers[max(matches, key=len)]


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return cycles


def upward_imports(edges: dict[str, set[str]], layers: dict[str, int]) -> list[str]:
    """Imports from a lower layer into a higher one, as ``"importer -> imported"``."""
    return sorted(
        f"{a} -> {b}" for a, targets in edges.items() for b in targets if layer_of(b, layers) > layer_of(a, layers)
    )


def project_sources() -> tuple[dict[str, str], set[str]]:
    sources: dict[str, str] = {}
    packages: set[str] = set()
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
                packages.add(".".join(parts))
            sources[".".join(parts)] = path.read_text()
    return sources, packages


@pytest.fixture(scope="module")
def graph() -> Graph:
    sources, packages = project_sources()
    return build_graph(sources, packages)


def test_graph_sees_function_level_imports(graph):
    assert len(graph.sources) > 40
    assert "xrec_pl.tools.pipeline" in graph.edges["xrec_pl.cli"]  # imported inside a function
    assert "xrec_pl.errors" in graph.edges["xrec_pl.data.io"]


def test_every_module_has_a_layer(graph):
    for module in graph.sources:
        layer_of(module, LAYERS)


def test_no_import_cycles(graph):
    assert find_cycles(graph.edges) == []


def test_imports_flow_one_way(graph):
    assert upward_imports(graph.edges, LAYERS) == []


def test_nothing_imports_the_cli(graph):
    assert [m for m, targets in graph.edges.items() if "xrec_pl.cli" in targets] == []


def test_no_private_name_crosses_modules(graph):
    assert graph.private == []


def test_no_private_member_of_another_object(graph):
    assert sorted(set(private_attribute_access(graph.sources)) - FOREIGN_INTERNALS) == []


def test_private_access_checker_catches_foreign_members():
    source = (
        "class C:\n"
        "    def f(self, trainer, pl_module):\n"
        "        self._ok = super()._fine()\n"
        "        dm = trainer.datamodule\n"
        "        trainer.datamodule._builder.encode(pl_module._llm)\n"
        "        dm._rows = 1\n"
    )
    assert private_attribute_access({"callbacks.x": source}) == [
        "callbacks.x: dm._rows",
        "callbacks.x: pl_module._llm",
        "callbacks.x: trainer.datamodule._builder",
    ]


def test_checker_finds_violations_in_a_bad_graph():
    sources = {
        "pkg": "",
        "pkg.low": "def f():\n    from pkg.high import g\n",  # function-level import of a higher layer
        "pkg.high": "from pkg.low import f\nfrom pkg.mid import _hidden\n",
        "pkg.mid": "import pkg.low as low\nx = low._secret\nfrom . import high\n",
    }
    layers = {"pkg": 0, "pkg.low": 1, "pkg.mid": 2, "pkg.high": 3}
    bad = build_graph(sources, {"pkg"})
    assert bad.edges["pkg.low"] == {"pkg.high"}
    assert bad.edges["pkg.mid"] == {"pkg.low", "pkg.high"}
    assert find_cycles(bad.edges) == [["pkg.high", "pkg.low", "pkg.mid"]]
    assert upward_imports(bad.edges, layers) == ["pkg.low -> pkg.high", "pkg.mid -> pkg.high"]
    assert sorted(bad.private) == ["pkg.high: pkg.mid._hidden", "pkg.mid: pkg.low._secret"]
    with pytest.raises(KeyError, match="pkg.other"):
        layer_of("pkg.other", {"pkg.low": 1})


def test_checker_passes_a_clean_graph():
    sources = {"pkg": "", "pkg.low": "X = 1\n", "pkg.high": "from pkg.low import X\nfrom pkg import low\n"}
    clean = build_graph(sources)
    assert find_cycles(clean.edges) == []
    assert upward_imports(clean.edges, {"pkg": 0, "pkg.low": 1, "pkg.high": 2}) == []
    assert clean.private == []


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


# loaders that run code from the file they read; the project's restricted unpickler (xrec_pl.data.pickles) is the one
# way in for pickles, safe_torch_load for checkpoints
UNSAFE_LOADERS = (
    "pickle.load",
    "pickle.loads",
    "pd.read_pickle",
    "pandas.read_pickle",
    "yaml.load",
    "yaml.unsafe_load",
)


def test_every_torch_load_is_weights_only():
    """No ``torch.load`` in the shipped code without a literal ``weights_only=True`` (checkpoints are untrusted), and
    no Lightning ``load_from_checkpoint`` (it unpickles with its own defaults; use safe_torch_load + load_validated)."""
    sources, _ = project_sources()
    offenders = []
    for module, text in sources.items():
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            if name == "torch.load":
                flag = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    offenders.append(f"{module}:{node.lineno} torch.load without weights_only=True")
            elif name.endswith("load_from_checkpoint") or name in UNSAFE_LOADERS:
                offenders.append(f"{module}:{node.lineno} {name}")
            if any(k.arg == "trust_remote_code" and getattr(k.value, "value", False) is True for k in node.keywords):
                offenders.append(f"{module}:{node.lineno} trust_remote_code=True")
    assert not offenders, offenders
