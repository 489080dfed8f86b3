"""The layers hold: which package may import which (import-linter's contracts in pyproject.toml), what a device install
may import at all, and that the wheel carries every package of the tree."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def test_every_import_contract_is_kept() -> None:
    """agent imports neither fleet nor firmware_sim; fleet never imports firmware_sim; CLI commands do not import
    each other; nothing below the CLI imports click; the store imports no layer above it."""
    done = subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert f"Contracts: {len(contracts)} kept, 0 broken." in done.stdout


def test_a_broken_contract_fails_the_check(tmp_path: Path) -> None:
    """The check can fail: a config forbidding an import the tree has is reported broken."""
    config = tmp_path / "broken.toml"
    config.write_text(
        '[tool.importlinter]\nroot_packages = ["agent", "fleet"]\n\n[[tool.importlinter.contracts]]\n'
        'name = "nothing may use the wire contract"\ntype = "forbidden"\nsource_modules = ["fleet"]\n'
        'forbidden_modules = ["agent.protocol"]\n'
    )
    done = subprocess.run([LINT_IMPORTS, "--no-cache", "--config", config], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 1
    assert "BROKEN" in done.stdout


def test_the_agent_package_imports_nothing_of_the_fleet() -> None:
    """The agent installs on a Pi without the fleet: its modules, subpackages included, may import only the stdlib and
    the agent extras."""
    allowed = {"numpy", "paho", "msgspec", "cryptography", "tuf", "securesystemslib", "onnxruntime", "ai_edge_litert",
               "tflite_runtime", "agent", "__future__"}  # fmt: skip
    stdlib = set(sys.stdlib_module_names)
    modules = sorted((ROOT / "agent").rglob("*.py"))
    assert any(p.parent.name == "update" for p in modules)
    for path in modules:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top in allowed or top in stdlib, f"{path.relative_to(ROOT)} imports {name}"


def test_the_wheel_lists_every_package_of_the_tree() -> None:
    """pyproject lists packages one by one: a new subpackage left out would be missing from the install."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts).replace("firmware-sim", "firmware_sim")
        for top in ("agent", "fleet", "firmware-sim")
        for p in (ROOT / top).rglob("__init__.py")
    }
    assert found == listed
