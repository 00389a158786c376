"""The package's shape: one public API at the top, and layers that only import downwards.

The folder tree is the data flow (ARCHITECTURE.md): ``core`` holds the primitives and imports
nothing else from the package; each later stage may import only the stages before it; nothing
imports ``cli``. A new subpackage must be given its place in :data:`ALLOWED` before it lands.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import persona_lens

PACKAGE = Path(persona_lens.__file__).parent

# subpackage (or top-level module) -> the parts of the package it may import
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "interop": {"core"},
    "traits": {"core", "interop"},
    "judges": {"core", "interop", "traits"},
    "extraction": {"core", "interop", "traits", "judges"},
    "monitoring": {"core", "interop", "traits", "judges", "extraction"},
    "screening": {"core", "interop", "traits", "judges", "extraction"},
    "training": {"core", "interop", "traits", "judges", "extraction", "monitoring", "screening"},
    "serving": {"core", "interop", "traits", "judges", "extraction", "monitoring"},
    "demo": {"core", "interop", "traits", "judges", "extraction", "monitoring", "screening"},
    "cli": {"*"},
    "__init__": {"core"},  # plus lazy, type-checking-only imports of the public API
}


def _part(module: str) -> str:
    """``persona_lens.core.models`` -> ``core``; ``persona_lens`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every ``persona_lens...`` module a file imports, outside ``if TYPE_CHECKING`` blocks."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module == "persona_lens":  # from persona_lens import x
                names = [f"persona_lens.{a.name}" for a in node.names]
            found += [(node.lineno, n) for n in names if n.split(".")[0] == "persona_lens"]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
            found += [(node.lineno, n) for n in names if n.split(".")[0] == "persona_lens"]
    return found


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_part_of_the_package_has_a_declared_layer() -> None:
    parts = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in _sources()}
    assert parts <= set(ALLOWED), f"undeclared parts: {sorted(parts - set(ALLOWED))}"


def test_layers_only_import_downwards() -> None:
    wrong = []
    for path in _sources():
        own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        allowed = ALLOWED[own] | {own}
        for line, module in _imports(path):
            target = _part(module)
            if target == "cli" and own != "cli":
                wrong.append(f"{path.relative_to(PACKAGE)}:{line} imports the CLI ({module})")
            elif "*" not in allowed and target not in allowed:
                wrong.append(f"{path.relative_to(PACKAGE)}:{line}: {own} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_core_imports_nothing_outside_core() -> None:
    for path in (PACKAGE / "core").rglob("*.py"):
        for line, module in _imports(path):
            assert module.startswith("persona_lens.core"), f"{path.name}:{line} imports {module}"


def test_layering_check_sees_a_violation(tmp_path: Path) -> None:
    """The parser finds imports at any depth, and skips TYPE_CHECKING-only ones."""
    source = tmp_path / "m.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "def f():\n    from persona_lens.cli.app import app\n"
        "if TYPE_CHECKING:\n    from persona_lens.extraction.extract import extract\n"
        "import persona_lens.judges.base\n"
    )
    found = sorted(m for _, m in _imports(source))
    assert found == ["persona_lens.cli.app", "persona_lens.judges.base"]


def test_public_api_names_import_and_have_docstrings() -> None:
    assert "load_model" in persona_lens.__all__ and "PersonaVector" in persona_lens.__all__
    for name in persona_lens.__all__:
        value = getattr(persona_lens, name)
        if name == "__version__":
            assert isinstance(value, str)
            continue
        doc = (getattr(value, "__doc__", None) or "").strip()
        # a dataclass without a docstring gets its signature as __doc__: not documentation
        assert doc and not doc.startswith(f"{name}("), f"{name} has no docstring"
    reloaded = importlib.import_module("persona_lens")
    assert set(reloaded.__all__) <= set(dir(reloaded))
