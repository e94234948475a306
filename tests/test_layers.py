"""The layers of docs/DESIGN.md ("Layers"), checked by import-linter's `lint-imports` with the contracts in
pyproject.toml, as CI runs it (.ci/run); and that the check catches what it is there for: a lower module
importing an upper one, at module level or inside a function (the circle that issue 22 found:
analysis/diagnostics.py imported `runner.is_main_process` inside a method)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}  # the copy under test, not the checkout
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def copy_of_the_package(tmp_path: Path) -> Path:
    for part in ("seqdpo", "hydra_plugins"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def test_the_package_keeps_its_contracts():
    proc = lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 kept, 0 broken" in proc.stdout, proc.stdout


def test_an_upward_import_inside_a_function_breaks_the_layers(tmp_path):
    root = copy_of_the_package(tmp_path)
    module = root / "seqdpo" / "analysis" / "transfer.py"
    module.write_text(module.read_text() + "\n\ndef _main() -> bool:\n    from seqdpo.runner import is_main_process\n\n"
                      "    return is_main_process()\n")
    proc = lint_imports(root)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "seqdpo imports only downwards BROKEN" in proc.stdout, proc.stdout
    assert "seqdpo.analysis.transfer -> seqdpo.runner" in proc.stdout, proc.stdout


def test_an_import_of_hydra_below_the_entry_is_refused(tmp_path):
    root = copy_of_the_package(tmp_path)
    module = root / "seqdpo" / "trainer.py"
    module.write_text(module.read_text() + "\n\nfrom hydra.core.hydra_config import HydraConfig  # noqa: E402\n")
    proc = lint_imports(root)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "only the entry layer touches Hydra BROKEN" in proc.stdout, proc.stdout
    assert "seqdpo.trainer -> hydra" in proc.stdout, proc.stdout


def test_no_module_imports_one_that_imports_it_back():
    """acyclic_siblings (pyproject.toml) checks the siblings of each package; this also covers a package and its
    own modules (the dataset builders imported `seqdpo.data`, which imports them to register them)."""
    graph = grimp.build_graph("seqdpo", cache_dir=None)
    circles = sorted(
        (importer, imported)
        for importer in graph.modules
        for imported in graph.find_modules_directly_imported_by(importer)
        if imported != importer and graph.chain_exists(importer=imported, imported=importer)
    )
    assert circles == []


def test_every_module_has_a_layer():
    """A module the layers contract does not name is checked by nothing: a new one must be placed."""
    import tomllib

    layers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]["layers"]
    named = {m.strip() for layer in layers for part in layer.split(":") for m in part.split("|")}
    graph = grimp.build_graph("seqdpo", cache_dir=None)
    top = {".".join(m.split(".")[:2]) for m in graph.modules if m != "seqdpo"}
    assert sorted(top - named) == []


def _unexplained_function_level_imports(root: Path) -> list[str]:
    """seqdpo imports inside a function with no comment on their line or on the import block above them."""
    import ast

    found = []
    for path in sorted((root / "seqdpo").rglob("*.py")):
        lines = path.read_text().splitlines()
        for fn in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                    [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if not any(n == "seqdpo" or n.startswith("seqdpo.") for n in names):
                    continue
                i = node.lineno - 1
                while i > 0 and lines[i - 1].strip().startswith(("from ", "import ")) and "#" not in lines[i]:
                    i -= 1  # up the block of imports this one belongs to
                if "#" not in lines[i] and not lines[i - 1].strip().startswith("#"):
                    found.append(f"{path.relative_to(root)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    return found


def test_a_function_level_import_of_seqdpo_says_why():
    """Imports are at module level (docs/DESIGN.md, "Layers"); one inside a function must say why it is there."""
    assert _unexplained_function_level_imports(ROOT) == []


def test_an_unexplained_function_level_import_is_found(tmp_path):
    root = copy_of_the_package(tmp_path)
    module = root / "seqdpo" / "analysis" / "transfer.py"
    module.write_text(module.read_text() + "\n\ndef _late():\n    from seqdpo.config import RunConfig\n\n    return RunConfig\n")
    assert _unexplained_function_level_imports(root) == ["seqdpo/analysis/transfer.py:" + str(len(module.read_text().splitlines()) - 2)
                                                         + ": from seqdpo.config import RunConfig"]
