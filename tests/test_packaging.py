"""The wheel installs under the forgetrt namespace only (no top-level runtime/export/tools/train),
ships every source module, and imports from a non-editable install."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(REPO)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = out.glob("forgetrt-*.whl")
    return whl


def test_wheel_is_namespaced_and_complete(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"forgetrt"}, tops
    for folder in ("runtime", "export", "train", "tools"):
        for py in (REPO / folder).rglob("*.py"):
            rel = py.relative_to(REPO / folder).as_posix()
            assert f"forgetrt/{folder}/{rel}" in names, f"{folder}/{rel} missing from the wheel"
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "forgetrt = forgetrt.tools.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_non_editable_install_imports(wheel, tmp_path):
    target = tmp_path / "site"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    code = (
        "import forgetrt.runtime, forgetrt.train.workflows, forgetrt.tools.cli, sys;"
        "print(forgetrt.runtime.__file__);"
        "import importlib.util as u; sys.exit(any(u.find_spec(m) for m in ('runtime', 'tools', 'export', 'train')))"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().startswith(str(target))
