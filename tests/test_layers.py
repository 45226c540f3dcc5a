"""The package's dependency picture runs one way (docs/design.md, the layer rule):

    cli → (project | serve | tools) → (compiler | runtime)
        → frontend / quant / lowering / targets → artifacts / devices → errors / paths

checked twice: statically over every import statement in fmc/ (function-local ones too), and
by importing the runtime in a fresh interpreter and looking at what got loaded (the compiler's
side: tests/test_build.py)."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fmc"

# A module's part: the first prefix it falls under.
PARTS = {
    "fmc.cli": "cli", "fmc.__main__": "cli",
    "fmc.project": "project", "fmc.serve": "serve", "fmc.tools": "tools",
    "fmc.compiler": "compiler", "fmc.compile_cache": "compiler", "fmc.products": "compiler",
    "fmc.options": "compiler",
    "fmc.runtime": "runtime",
    "fmc.frontend": "model", "fmc.quant": "model", "fmc.lowering": "model",
    "fmc.targets": "model", "fmc.nn_ops": "model", "fmc.nn_moe": "model",
    "fmc.artifacts": "artifacts", "fmc.devices": "devices",
    "fmc.errors": "base", "fmc.paths": "base", "fmc.model_config": "base",
    "fmc.plugins": "base",
}
# What each part may import besides itself. `fmc` alone (the package: `__version__` and
# the lazy `fmc.load`/`fmc.compile`) may be imported from anywhere above the model layer.
BELOW_MODEL = {"artifacts", "devices", "base"}
ALLOWED = {
    "cli": {"project", "serve", "tools", "compiler", "runtime", "model"} | BELOW_MODEL,
    "tools": {"runtime", "model"} | BELOW_MODEL,
    "project": {"compiler", "model"} | BELOW_MODEL,
    "serve": {"runtime"} | BELOW_MODEL,
    "compiler": {"model"} | BELOW_MODEL,
    "runtime": BELOW_MODEL,  # never the frontend, quant, lowering or targets
    "model": BELOW_MODEL,
    "artifacts": {"base"},
    "devices": {"base"},
    "base": set(),
}
FACADE_USERS = {"cli", "tools", "project", "serve", "compiler"}


def part(module: str) -> str | None:
    for prefix, name in sorted(PARTS.items(), key=lambda item: -len(item[0])):
        if module == prefix or module.startswith(prefix + "."):
            return name
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, name: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, module) for every fmc import in module `name`'s `source`, relative ones
    resolved; `from fmc.x import y` counts as fmc.x.y when y is a module."""
    package = name if is_package else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                candidate = PACKAGE.parent / f"{base}.{alias.name}".replace(".", "/")
                is_module = candidate.with_suffix(".py").is_file() or candidate.is_dir()
                found.append((node.lineno, f"{base}.{alias.name}" if is_module else base))
    return [(line, module) for line, module in found if module.split(".")[0] == "fmc"]


def layer_violations(name: str, imports: list[tuple[int, str]]) -> list[str]:
    mine, violations = part(name), []
    for line, target in imports:
        theirs = part(target)
        if target == "fmc":
            if mine not in FACADE_USERS:
                violations.append(f"{name}:{line}: {mine} imports the fmc facade")
        elif theirs != mine and theirs not in ALLOWED[mine]:
            violations.append(f"{name}:{line}: {mine} imports {target} ({theirs})")
    return violations


def test_every_module_belongs_to_a_layer():
    unplaced = [module_name(p) for p in PACKAGE.rglob("*.py")
                if module_name(p) != "fmc" and part(module_name(p)) is None]
    assert unplaced == [], "add these to PARTS (and to docs/design.md's layers)"


def test_imports_follow_the_layer_rule():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        if name != "fmc":  # the package's lazy facade
            imports = imported_modules(path.read_text(encoding="utf-8"), name,
                                       path.name == "__init__.py")
            violations += layer_violations(name, imports)
    assert violations == []


def test_the_checker_reports_forbidden_imports():
    """Negative control: a function-local runtime → frontend import, a relative import
    climbing out of the model layer and a model → facade import are each reported."""
    runtime = imported_modules("def f():\n    from fmc.frontend.source import open_model\n",
                               "fmc.runtime.engine")
    assert runtime == [(2, "fmc.frontend.source")]
    assert layer_violations("fmc.runtime.engine", runtime) == [
        "fmc.runtime.engine:2: runtime imports fmc.frontend.source (model)"]
    relative = imported_modules("from ..runtime import engine\n", "fmc.quant.q4")
    assert layer_violations("fmc.quant.q4", relative) == [
        "fmc.quant.q4:1: model imports fmc.runtime.engine (runtime)"]
    assert layer_violations("fmc.quant.q4", [(3, "fmc")]) == [
        "fmc.quant.q4:3: model imports the fmc facade"]
    assert layer_violations("fmc.runtime.engine", [(1, "fmc.artifacts.abi")]) == []


def loaded_after(statement: str) -> list[str]:
    """The modules a fresh interpreter holds after `statement`."""
    code = f"{statement}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=PACKAGE.parent)
    return json.loads(result.stdout.splitlines()[-1])


def test_loading_the_runtime_imports_no_compiler_module():
    """Every module of fmc.runtime (and of fmc.serve, which runs on it, where its extra is
    installed) imported in a fresh process: nothing of the frontend, quantization, lowering,
    targets or compiler comes along."""
    parts = ("runtime", "serve") if importlib.util.find_spec("fastapi") else ("runtime",)
    modules = sorted(module_name(p) for d in parts for p in (PACKAGE / d).rglob("*.py"))
    loaded = loaded_after("import importlib\n" + "\n".join(
        f"importlib.import_module({m!r})" for m in modules))
    assert {"fmc.runtime.engine", "fmc.runtime.kv_cache", "fmc.runtime.artifact"} <= set(loaded)
    forbidden = ("fmc.frontend", "fmc.quant", "fmc.lowering", "fmc.targets", "fmc.compiler",
                 "fmc.compile_cache", "fmc.tools", "fmc.project")
    assert [m for m in loaded if m.startswith(forbidden)] == []

