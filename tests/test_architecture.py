"""The package's layering (platform/ARCHITECTURE.md's "Layers" block): no import that points up a layer, no import
cycle inside mocolab (imports inside functions count too), and no mechanism name outside moco/ and the schema."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

from mocolab.moco.mechanisms import MECHANISMS

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "mocolab"
ARCHITECTURE = PACKAGE.parent / "ARCHITECTURE.md"
SCHEMA_ASKS_CORE = {
    ("mocolab.config.model", "mocolab.moco.mechanisms"),
    ("mocolab.config.schema", "mocolab.moco.mechanisms"),
    ("mocolab.config.schema", "mocolab.moco.mechanisms.base"),
    ("mocolab.config.schema", "mocolab.moco.timm_backbones"),
    ("mocolab.config.base", "mocolab.moco.timm_backbones"),
}
"""The documented exception: the schema runs the mechanisms' own rules and the timm name check."""
TRACKING_KNOWS_NOTHING_OF = ("mocolab.moco", "mocolab.data", "mocolab.weights_io")
"""tracking/ is the MLflow edge: what the model, the data or a weights file know comes in from its callers."""
NOT_MECHANISM_NAMES = {("mocolab.evaluate.weights", "moco")}
"""Strings equal to a mechanism's name that mean something else: a MoCo-pretrained backbone's label ("moco" vs
"random" in run names and tables)."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """mocolab module -> the mocolab modules it imports anywhere in its file (module level or in functions)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(
                        package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                    )
                # ``from mocolab.x import y`` imports submodule mocolab.x.y when there is one
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names
                ]
            for target in targets:
                while target and target not in modules:  # ``import mocolab.a.b`` -> the deepest known module
                    target = target.rpartition(".")[0]
                if target and target != name and target != "mocolab":
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_detection_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_function_level_imports():
    graph = import_graph()
    assert "mocolab.train.launch" in graph["mocolab.orchestrate"]  # imported inside a function
    assert "mocolab.moco.mechanisms.queue" in graph["mocolab.moco.model"]


def test_mocolab_has_no_import_cycles():
    assert cycles(import_graph()) == []


def documented_layers(text: str) -> list[tuple[str, list[str]]]:
    """``[(layer, [path, ...]), ...]`` top to bottom from the "Layers" code block: ``train/``, ``tune/sweep.py``."""
    block = text.split("## Layers", 1)[1].split("```", 2)[1]
    layers: list[tuple[str, list[str]]] = []
    for line in block.splitlines():
        name = line[:14].strip()
        paths = re.findall(r"(?<![\w./])((?:\w+/)*\w+(?:\.py|/))", re.sub(r"\([^)]*\)", "", line[14:]))
        if name:
            layers.append((name, []))
        if layers:
            layers[-1][1].extend(paths)
    return layers


def layer_of(module: str, layers: list[tuple[str, list[str]]]) -> int | None:
    """Index (0 = top) of the layer of the longest documented path that holds ``module``, or None."""
    path = module.removeprefix("mocolab").lstrip(".").replace(".", "/")
    best: tuple[int, int] | None = None
    for index, (_, paths) in enumerate(layers):
        for listed in paths:
            stem = listed.removesuffix(".py").rstrip("/")
            if (path == stem or path.startswith(stem + "/")) and (best is None or len(stem) > best[1]):
                best = (index, len(stem))
    return None if best is None else best[0]


def upward_imports(graph: dict[str, set[str]], layers, allowed=frozenset()) -> list[str]:
    found = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            low, high = layer_of(module, layers), layer_of(target, layers)
            if low is not None and high is not None and high < low and (module, target) not in allowed:
                found.append(f"{module} ({layers[low][0]}) imports {target} ({layers[high][0]})")
    return found


def imports_into(graph: dict[str, set[str]], package: str, forbidden: tuple[str, ...]) -> list[str]:
    """``module imports target`` for every module of ``package`` that imports a module of a ``forbidden`` one."""
    inside = [m for m in graph if m == package or m.startswith(package + ".")]
    return [
        f"{module} imports {target}"
        for module in sorted(inside)
        for target in sorted(graph[module])
        if any(target == f or target.startswith(f + ".") for f in forbidden)
    ]


def test_forbidden_import_detection_finds_one():
    graph = {
        "mocolab.tracking.runs": {"mocolab.config", "mocolab.data.datasets"},
        "mocolab.tracking": set(),
        "mocolab.trackingx": {"mocolab.moco.model"},  # another package that only starts with the same letters
        "mocolab.dataset_tools": set(),
    }
    assert imports_into(graph, "mocolab.tracking", TRACKING_KNOWS_NOTHING_OF) == [
        "mocolab.tracking.runs imports mocolab.data.datasets"
    ]


def test_tracking_imports_nothing_of_the_model_the_data_or_weights_files():
    graph = import_graph()
    assert "mocolab.tracking.runs" in graph and "mocolab.tracking.store" in graph["mocolab.tracking.runs"]
    assert imports_into(graph, "mocolab.tracking", TRACKING_KNOWS_NOTHING_OF) == []


def mechanism_names_outside_moco() -> list[str]:
    """``module:line 'name'`` for every string literal equal to a registered mechanism name outside moco/ and the
    schema (code that knows a mechanism by its name instead of asking its class)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        if module.startswith(("mocolab.moco", "mocolab.config")):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Constant)
                and node.value in MECHANISMS
                and (module, node.value) not in NOT_MECHANISM_NAMES
            ):
                found.append(f"{module}:{node.lineno} {node.value!r}")
    return found


def test_the_documented_layers_parse_and_place_every_module():
    layers = documented_layers(ARCHITECTURE.read_text())
    assert [name for name, _ in layers] == ["commands", "orchestration", "checks", "stages", "edges", "core", "schema"]
    assert "tune/sweep.py" in layers[1][1] and "train/" in layers[3][1]
    unplaced = [m for m in import_graph() if m != "mocolab" and layer_of(m, layers) is None]
    assert unplaced == []


def test_upward_import_detection_finds_one():
    layers = [("top", ["cli.py"]), ("middle", ["train/"]), ("bottom", ["moco/", "train/sweep.py"])]
    graph = {
        "mocolab.train.launch": {"mocolab.cli", "mocolab.moco.model"},
        "mocolab.moco.model": set(),
        "mocolab.train.sweep": {"mocolab.train.launch"},
        "mocolab.cli": {"mocolab.train.launch"},
    }
    assert upward_imports(graph, layers) == [
        "mocolab.train.launch (middle) imports mocolab.cli (top)",
        "mocolab.train.sweep (bottom) imports mocolab.train.launch (middle)",  # the longest listed path decides
    ]


def test_no_import_points_up_a_layer():
    assert upward_imports(import_graph(), documented_layers(ARCHITECTURE.read_text()), SCHEMA_ASKS_CORE) == []


def test_mechanism_name_detection_finds_one(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "mocolab")
    (tmp_path / "mocolab" / "reproduce").mkdir(parents=True)
    (tmp_path / "mocolab" / "moco").mkdir()
    (tmp_path / "mocolab" / "reproduce" / "x.py").write_text('FACTOR = {"end_to_end": 1.5}\nOTHER = "moco.dim"\n')
    (tmp_path / "mocolab" / "moco" / "y.py").write_text('NAME = "end_to_end"\n')
    assert mechanism_names_outside_moco() == ["mocolab.reproduce.x:1 'end_to_end'"]


def test_no_mechanism_name_outside_moco_and_the_schema():
    assert mechanism_names_outside_moco() == []
