"""The import direction the design promises, read from the source: core <- losses <- methods, lm <- prune, quant <-
pipeline stage kinds <- recipes. A change that imports upwards, or closes an import circle, fails here."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("distill", "prune", "quant")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, roots: tuple[str, ...] = PACKAGES) -> set[str]:
    """Every module under `roots` that `path` imports, at any depth of the file (imports inside functions count
    too)."""
    package = module_name(path).split(".") if path.name == "__init__.py" else module_name(path).split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in roots}


def source_files(*folders: str) -> list[Path]:
    return sorted(path for folder in folders for path in (ROOT / folder).rglob("*.py"))


GRAPH = {module_name(path): imported_modules(path) for path in source_files(*PACKAGES)}

FORBIDDEN = {
    # importer prefix: prefixes it must not import
    "distill": ("prune", "quant"),
    "distill.core": ("distill.losses", "distill.encoder", "distill.lm", "distill.pipeline"),
    "distill.losses": ("distill.encoder", "distill.lm", "distill.pipeline"),
    "distill.encoder": ("distill.lm", "distill.pipeline"),
    "distill.lm": ("distill.encoder", "distill.pipeline"),
    # siblings: a pruned model reaches quantization as a saved folder, never through an import
    "prune": ("quant",),
    "quant": ("prune",),
}


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_each_layer_imports_only_layers_below_it():
    wrong = [f"{module} imports {target}" for module, targets in GRAPH.items() for layer, banned in FORBIDDEN.items()
             if within(module, layer) for target in sorted(targets) if any(within(target, b) for b in banned)]
    assert not wrong, "\n".join(wrong)


def test_prune_and_quant_reach_the_pipeline_only_to_register_stage_kinds():
    wrong = [f"{module} imports {target}" for module, targets in GRAPH.items()
             if module.split(".")[0] in ("prune", "quant") and not module.endswith("stages")
             for target in targets if within(target, "distill.pipeline")]
    assert not wrong, "\n".join(wrong)


def test_no_import_circles():
    """Among the project's modules (a name that is a module's attribute counts as that module)."""
    modules = set(GRAPH)
    edges = {module: {target if target in modules else target.rpartition(".")[0] for target in targets} & modules
             - {module} for module, targets in GRAPH.items()}
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target] if target in path else [module, target]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(modules):
        if module not in state:
            visit(module, [module])


def imported_test_module(name: str) -> str | None:
    """The test module (`tests.<...>.test_*`) that the imported `name` is or lies in, if any."""
    parts = name.split(".")
    ends = [i for i, part in enumerate(parts) if part.startswith("test_")]
    return ".".join(parts[:ends[0] + 1]) if ends else None


def test_no_test_module_imports_another():
    """What tests share lives in tests/helpers/ or a conftest.py: a test module that others import cannot change its
    own fixtures and names without breaking them."""
    wrong = sorted({f"{module_name(path)} imports {target}" for path in source_files("tests")
                    for target in map(imported_test_module, imported_modules(path, ("tests",))) if target})
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("importer, target, expected", [
    ("distill.core.trainer", "distill.losses.causal.registered", False),
    ("distill.encoder.job", "distill.core.run", True),
    ("prune.run", "distill.pipeline.plan", True),  # allowed by the layers; only *stages modules may (test above)
    ("quant.quantize_lm", "prune.saving", False),
    ("prune.lm", "quant.export.gguf", False),
])
def test_the_rules_read_the_layers_as_intended(importer, target, expected):
    """The rules' own check: an upward import from core is caught; downward ones are allowed."""
    banned = [b for layer, bans in FORBIDDEN.items() if within(importer, layer) for b in bans]
    assert (not any(within(target, b) for b in banned)) == expected
