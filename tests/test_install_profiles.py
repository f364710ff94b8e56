"""Install profiles: the base install serves without torch, the onnxruntime builds come from exactly one
of two extras, and a command that needs an extra says which.

Three levels: the declared requirements (metadata); a serving run in this environment with torch,
scikit-learn and matplotlib made unimportable (every process of it); and, where ``.ci/run`` built one
(``FORGETRT_SERVING_PYTHON``), a separate environment installed with ``pip install ".[cpu]"`` alone."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from forgetrt.tools.cli import EXTRAS, missing_extra_message

REPO = Path(__file__).resolve().parents[1]
TRAINING_ONLY = ("torch", "sklearn", "matplotlib")


def _requirements() -> tuple[list[str], dict[str, list[str]]]:
    """(base requirement names, extra -> requirement names) from pyproject.toml, as pip will read them."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def name(req: str) -> str:
        return re.split(r"[\s<>=!~\[;]", req, maxsplit=1)[0].lower()

    extras = {k: [name(r) for r in v] for k, v in project["optional-dependencies"].items()}
    return [name(r) for r in project["dependencies"]], extras


def test_the_base_install_has_no_torch_and_no_onnxruntime_build():
    base, extras = _requirements()
    assert "torch" not in base and "scikit-learn" not in base and "matplotlib" not in base
    assert not {"onnxruntime", "onnxruntime-gpu"} & set(base)  # the build is the user's choice: cpu or gpu
    assert {"starlette", "uvicorn", "numpy", "onnx", "click", "safetensors", "prometheus-client"} <= set(base)
    assert extras["cpu"] == ["onnxruntime"] and extras["gpu"] == ["onnxruntime-gpu"]
    assert "torch" in extras["train"] and "tensorrt" in extras["trt"] and "ray" in extras["ray"]
    # no extra (dev included) pulls both builds: the second would shadow the first's providers
    for extra, reqs in extras.items():
        expanded = set(reqs)
        for r in reqs:  # self-references such as forgetrt[cpu,train]
            if r == "forgetrt":
                inner = re.search(r"\[(.*)\]", next(x for x in _raw_extras()[extra] if x.startswith("forgetrt")))
                for e in inner.group(1).split(","):
                    expanded |= set(extras[e.strip()])
        assert not {"onnxruntime", "onnxruntime-gpu"} <= expanded, extra


def _raw_extras() -> dict[str, list[str]]:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def test_a_missing_module_names_its_extra():
    def err(name: str) -> ModuleNotFoundError:
        e = ModuleNotFoundError(f"No module named '{name}'")
        e.name = name
        return e

    assert "pip install 'forgetrt[train]'" in missing_extra_message(err("torch"), "train-model")
    assert "forgetrt train-model" in missing_extra_message(err("torch.nn"), "train-model")
    assert "'forgetrt[cpu]'" in missing_extra_message(err("onnxruntime"), "serve")
    assert "forgetrt[ray]" in missing_extra_message(err("ray"), "serve")
    assert missing_extra_message(err("yaml"), "serve") is None  # not ours to explain: a real bug
    assert set(EXTRAS.values()) <= set(_requirements()[1])


def _blocked_env(tmp_path: Path, modules: tuple[str, ...]) -> dict[str, str]:
    """An environment whose Python processes (children included) cannot import ``modules``."""
    site = tmp_path / "block"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        f"import sys\nfor m in {modules!r}:\n    sys.modules[m] = None  # import raises ModuleNotFoundError\n"
    )
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}


def test_serving_works_where_torch_cannot_be_imported(digits_bundle, tmp_path):
    env = _blocked_env(tmp_path, TRAINING_ONLY)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "forgetrt.tools.serving_check",
            str(digits_bundle),
            "--expect-no",
            ",".join(TRAINING_ONLY),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["answers"] >= 3 and out["policies_change_logits"] and out["train_names_extra"]


@pytest.mark.skipif(
    not os.environ.get("FORGETRT_SERVING_PYTHON"),
    reason="set FORGETRT_SERVING_PYTHON to the python of a `pip install '.[cpu]' tritonclient[http]` "
    "environment (.ci/run builds one)",
)
def test_a_separate_serving_only_install_serves(digits_bundle):
    """...with front-end processes (`--workers 2`: spawned, they import the runtime without torch too)."""
    py = os.environ["FORGETRT_SERVING_PYTHON"]
    r = subprocess.run(
        [py, "-m", "forgetrt.tools.serving_check", str(digits_bundle), "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=240,
        cwd="/",  # the installed package, never this checkout
    )
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["train_names_extra"] and out["answers"] >= 3 and out["workers"] == 2
    r = subprocess.run([py, "-c", "import torch"], capture_output=True, text=True)
    assert r.returncode != 0  # truly absent, not hidden


@pytest.mark.skipif(
    not os.environ.get("FORGETRT_VISION_PYTHON"),
    reason="set FORGETRT_VISION_PYTHON to the python of an environment with a torch build and the torchvision "
    "that matches it (.ci/run builds one with torch 2.14.1 and torchvision 0.29.1)",
)
def test_bring_your_own_model_in_the_vision_environment():
    """tests/vision (torchvision and timm classifiers through training, vectors, export, graft, parity and
    serving) run in the vision environment: every test there must pass, none may skip."""
    py = os.environ["FORGETRT_VISION_PYTHON"]
    r = subprocess.run(
        [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", str(REPO / "tests" / "vision")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    summary = r.stdout.strip().splitlines()[-1]
    assert re.search(r"\b[1-9]\d* passed", summary) and "skipped" not in summary, summary
