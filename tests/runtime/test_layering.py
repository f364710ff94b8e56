"""Layering rules from the design notes, enforced: the runtime imports neither torch nor tensorrt, and
imports nothing of ours from outside itself; ``export`` and ``train`` depend on the runtime and never
on each other (no cycle); only ``tools`` (the CLI, the demo) sees them all."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_import_runtime_pulls_in_neither_torch_nor_tensorrt():
    code = (
        "import sys, forgetrt.runtime, forgetrt.runtime.backends, forgetrt.runtime.server;"
        "bad = [m for m in ('torch', 'tensorrt') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _our_imports(folder: str) -> list[tuple[str, str]]:
    """(file, module) for every absolute import of a forgetrt module in ``folder`` (function bodies included)."""
    out = []
    for py in (REPO / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(py.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                mods = [node.module]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            else:
                continue
            out += [(py.relative_to(REPO).as_posix(), m) for m in mods if m.startswith("forgetrt")]
    return out


def test_runtime_imports_nothing_of_ours_outside_itself():
    offenders = [(f, m) for f, m in _our_imports("runtime") if not m.startswith("forgetrt.runtime")]
    assert not offenders, offenders


@pytest.mark.parametrize(
    "folder, forbidden",
    [
        ("export", "forgetrt.train"),
        ("train", "forgetrt.export"),
        ("export", "forgetrt.tools"),
        ("train", "forgetrt.tools"),
    ],
)
def test_export_and_train_do_not_depend_on_each_other(folder, forbidden):
    offenders = [(f, m) for f, m in _our_imports(folder) if m.startswith(forbidden)]
    assert not offenders, offenders


def test_cli_imports_no_heavy_library():
    """`forgetrt --help` and `forgetrt serve` must not pay for torch (or onnx) at import."""
    code = (
        "import sys, forgetrt.tools.cli;"
        "bad = [m for m in ('torch', 'tensorrt', 'onnx', 'onnxruntime') if m in sys.modules];"
        "print(bad); sys.exit(bool(bad))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
