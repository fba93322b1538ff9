"""The package's shape: imports point down the pipeline, never in a circle, and never upward.

Layers, top to bottom (a module may import its own layer and any layer below it, never one above):
entry points -> sweeps -> analysis -> tracking -> pipeline -> sim -> datagen -> evaluation -> training -> model ->
data -> config -> foundations (utils, env, errors).
"""

from __future__ import annotations

import ast
from pathlib import Path

import grimp
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "leverplus"

LAYERS = [
    ("leverplus.train", "leverplus.compare", "leverplus.generate_rl_data", "leverplus.generate_beam_data",
     "leverplus.inspect_data", "leverplus.repool", "leverplus.evaluate"),
    ("leverplus.sweeps",),
    ("leverplus.analysis",),
    ("leverplus.tracking",),
    ("leverplus.pipeline",),
    ("leverplus.sim",),
    ("leverplus.datagen",),
    ("leverplus.evaluation",),
    ("leverplus.training",),
    ("leverplus.model",),
    ("leverplus.data",),
    ("leverplus.config",),
    ("leverplus.utils",),
    ("leverplus.env", "leverplus.errors"),
]

#: function-level imports that must stay lazy, and why
LAZY_IMPORTS_ALLOWED = {
    "transformers",  # optional heavy extra (pip install -e .[lvlm]); importing it costs seconds
    "flash_attn",  # optional CUDA extra
    "PIL",  # only with the hf scorer
    "huggingface_hub",  # only with the hf scorer
}


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("leverplus")


def test_every_module_sits_in_a_layer(graph):
    tops = {".".join(m.split(".")[:2]) for m in graph.modules} - {"leverplus"}
    known = {name for layer in LAYERS for name in layer}
    assert tops <= known, f"modules outside every layer: {sorted(tops - known)}"


def test_no_upward_imports(graph):
    illegal = graph.find_illegal_dependencies_for_layers(layers=[set(x) for x in LAYERS], containers={"leverplus"})
    described = sorted(f"{d.importer} -> {d.imported}: {[r['importer'] for r in d.routes][:3]}" for d in illegal)
    assert not illegal, "upward imports:\n" + "\n".join(described)


def test_no_import_cycles_between_modules(graph):
    cycles = []
    for m in sorted(graph.modules):
        for imp in graph.find_modules_directly_imported_by(m):
            if imp != m and graph.chain_exists(importer=imp, imported=m):
                cycles.append((m, imp))
    assert not cycles, f"import cycles: {cycles[:10]}"


def test_imports_sit_at_the_top_of_modules():
    """Function-level imports hide dependencies; only the optional heavy extras may stay lazy."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                else:
                    continue
                if not all(n.split(".")[0] in LAZY_IMPORTS_ALLOWED for n in names):
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {', '.join(names)}")
    assert not found, f"{len(found)} function-level imports:\n" + "\n".join(found)


def test_module_map_lists_every_module():
    listed = (PACKAGE.parent / "docs" / "modules.md").read_text()
    missing = [str(p.relative_to(PACKAGE.parent)) for p in sorted(PACKAGE.rglob("*.py"))
               if f"`{p.relative_to(PACKAGE.parent).as_posix()}`" not in listed]
    assert not missing, f"docs/modules.md lacks: {missing}"
