"""Layering rules from DESIGN.md, enforced: the runtime imports neither torch nor tensorrt, and
imports nothing of ours from outside itself."""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_import_runtime_pulls_in_neither_torch_nor_tensorrt():
    code = "import sys, forgetrt.runtime, forgetrt.runtime.backends, forgetrt.runtime.server; bad = [m for m in ('torch', 'tensorrt') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_runtime_imports_nothing_of_ours_outside_itself():
    offenders = []
    for py in (REPO / "runtime").rglob("*.py"):
        for node in ast.walk(ast.parse(py.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                mod = node.module
            elif isinstance(node, ast.Import):
                mod = node.names[0].name
            else:
                continue
            if mod.startswith("forgetrt") and not mod.startswith("forgetrt.runtime"):
                offenders.append(f"{py.name}: {mod}")
    assert not offenders, offenders
