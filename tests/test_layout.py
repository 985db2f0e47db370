"""The package layout mirrors the pipeline, and no layer imports from a layer above it."""
import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "saelab"
# Each subpackage and what it may import from saelab besides itself. core is the floor;
# cli and verify, at the top, read several stages' outputs and may import anything.
ALLOWED = {
    "core": set(),
    "data": {"core"},
    "activations": {"core", "data"},
    "sae": {"core", "data", "activations"},
    "scaling": {"core", "data", "activations", "sae"},
    "interpret": {"core", "data", "activations", "sae"},
    "hub": {"core", "activations"},
}
TOP = {"cli", "verify", "preflight", "__init__"}


def _modules():
    return sorted(p for p in SRC.rglob("*.py"))


def _package(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported_packages(source: str, here: tuple[str, ...]) -> set[str]:
    """saelab subpackages (or top modules) a module in package `here` imports, at any depth
    of its source (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(here[: len(here) - (node.level - 1)])
                parts = base + (node.module.split(".") if node.module else [])
                if not parts:  # `from . import x` at the top: x is the package
                    parts = [node.names[0].name]
            elif node.module and node.module.split(".")[0] == "saelab":
                parts = node.module.split(".")[1:] or [node.names[0].name]
            else:
                continue
            found.add(parts[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("saelab."):
                    found.add(alias.name.split(".")[1])
    return found


def test_every_module_sits_in_a_known_package():
    stray = [str(p.relative_to(SRC)) for p in _modules() if _package(p) not in {*ALLOWED, *TOP}]
    assert not stray, f"modules outside the pipeline's packages: {stray}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_no_import_from_a_higher_layer(path):
    package = _package(path)
    if package in TOP:
        return
    here = path.relative_to(SRC).parent.parts
    wrong = _imported_packages(path.read_text(), here) - ALLOWED[package] - {package}
    assert not wrong, f"{path.relative_to(SRC)} ({package}) imports from {sorted(wrong)}"


def test_the_check_sees_every_form_of_import():
    """The layer check must catch a wrong import in each form it can take."""
    text = ("def f():\n    from ..sae.train import train\n"
            "from ..activations import store\nimport saelab.hub.share\n"
            "from saelab.scaling.budget import compute_budget\nfrom .paths import MODEL_DIR\n")
    assert _imported_packages(text, ("core",)) == {"sae", "activations", "hub", "scaling",
                                                    "core"}
