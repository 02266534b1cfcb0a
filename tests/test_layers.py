"""Imports run downwards (DESIGN.md, "Layers"): every `import memstack.X` in the package -- at
module level or inside a function -- goes to the same layer or a lower one:

    cli, commands                      5
    engine, server, evals, train       4
    generate, checkpoint, hf, fid,
    adapters, adapter_init             3
    backbone                           2
    memory (and backbone/layers.py)    1   the backbone's layer primitives are shared building blocks
    ops, data, config, errors, atomic, registry   0

A memory family never imports the trainer, the harness, the engine or the command line. The few
upward imports that remain are listed in KNOWN with their reason; the list may only shrink (a
listed import that is gone fails too, so the list stays true)."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "memstack"
RANK = {"cli": 5, "commands": 5, "__main__": 5, "engine": 4, "server": 4, "evals": 4, "train": 4, "generate": 3, "checkpoint": 3,
        "hf": 3, "backbone": 2, "memory": 1, "backbone.layers": 1, "ops": 0, "data": 0, "config": 0, "errors": 0,
        "atomic": 0, "registry": 0, "adapters": 3, "adapter_init": 3, "fid": 3}
KNOWN = {
    # RAG's end-to-end answer pipeline generates with the model (memory/retrieval/rag.py is the
    # retrieval-system issue's file; its generation step belongs one layer up)
    ("memstack.memory.retrieval.rag", "memstack.generate"),
}


def layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "memstack" or len(parts) < 2:
        return None
    if parts[1] == "backbone" and len(parts) > 2 and parts[2] == "layers":
        return "backbone.layers"
    return parts[1]


def imports() -> list[tuple[str, str, int]]:
    """(importing module, imported module, line) for every absolute memstack import."""
    out = []
    for f in sorted(PKG.rglob("*.py")):
        mod = ".".join(f.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__")
        if mod == "memstack":
            continue                    # the package's public API re-exports from every layer
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            out += [(mod, n, node.lineno) for n in names if n.startswith("memstack.")]
    return out


def test_every_module_has_a_layer():
    unknown = {layer(m) for m, _, _ in imports()} - set(RANK)
    assert not unknown, f"modules in no layer: {unknown} -- give them one in RANK (and DESIGN.md)"


def test_imports_run_downwards():
    up = {(m, n) for m, n, _ in imports() if RANK[layer(m)] < RANK[layer(n)]}
    where = {(m, n): line for m, n, line in imports()}
    new = sorted(up - KNOWN)
    assert not new, "upward imports (move the code up, or the shared piece down):\n" + "\n".join(
        f"  {m}:{where[(m, n)]} ({layer(m)}) imports {n} ({layer(n)})" for m, n in new)
    gone = KNOWN - up
    assert not gone, f"no longer imported, remove from KNOWN: {sorted(gone)}"


def test_memory_and_below_never_import_the_trainer_harness_engine_or_cli():
    """The rule of issue 10 in its plainest form (no exceptions)."""
    bad = [(m, n, line) for m, n, line in imports()
           if layer(m) in ("memory", "backbone", "backbone.layers", "ops", "data", "config", "errors", "atomic")
           and layer(n) in ("train", "evals", "engine", "cli", "commands", "__main__")]
    assert not bad, "\n".join(f"  {m}:{line} imports {n}" for m, n, line in bad)
