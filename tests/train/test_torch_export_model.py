"""A classifier brought as a torch.export program (no Python model code): import, vectors, export, parity,
serving; programs that cannot serve are refused with the fix."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from imagefolder_data import CLASSES, make_imagefolder
from torch import nn

from forgetrt.runtime.errors import InvalidInputError
from forgetrt.runtime.model_folder import MODEL_PROGRAM, load_model, read_model_manifest
from forgetrt.tools.cli import cli


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 3),
    ).eval()


def _program(path, net, batch_dynamic=True, size=32):
    x = torch.rand(2, 3, size, size)
    dyn = ({0: torch.export.Dim("batch", min=1, max=4096)},) if batch_dynamic else None
    torch.export.save(torch.export.export(net, (x,), dynamic_shapes=dyn), str(path))
    return path


def _run(*args, ok=True):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert (r.exit_code == 0) == ok, r.output
    return r.output


def test_program_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGETRT_CACHE_DIR", str(tmp_path / "cache"))
    data = f"imagefolder:{make_imagefolder(tmp_path / 'img', n_train=8, n_test=4)}"
    net = _net()
    prog = _program(tmp_path / "net.pt2", net)
    m = tmp_path / "model"
    out = _run(
        "import-model",
        "--program",
        prog,
        "--image-size",
        32,
        "--labels",
        ",".join(CLASSES),
        "--normalize",
        "0.5,0.5,0.5/0.25,0.25,0.25",
        "--data",
        data,
        "--out",
        m,
    )
    assert out.startswith("torch.export: 3 classes, input 3x32x32")
    info = read_model_manifest(m)
    assert info.arch == "torch.export" and (m / MODEL_PROGRAM).is_file()
    assert info.training["imported"]["format"] == "torch.export" and "test_acc" in info.metrics
    model, _ = load_model(m)
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net((x - 0.5) / 0.25))  # exactly the user's program
    bank = tmp_path / "bank"
    _run(
        "train-vector",
        "--model",
        m,
        "--data",
        data,
        "--bank",
        bank,
        "--forget-classes",
        "square",
        "--name",
        "sq",
        "--epochs",
        2,
        "--batch-size",
        8,
        "--device",
        "cpu",
    )
    ev = tmp_path / "ev.json"
    _run("eval", "--model", m, "--data", data, "--bank", bank, "--vector", "sq", "--json", ev, "--device", "cpu")
    assert json.loads(ev.read_text())["n_forget"] == 8
    b = tmp_path / "bundle"
    _run("export", "onnx", "--model", m, "--bank", bank, "--vectors", "sq", "--out", b)
    files = json.loads((b / "bundle.json").read_text())["files"]
    assert "classifier.onnx" in files and "classifier.safetensors" not in files  # no program in a bundle
    pj = tmp_path / "p.json"
    _run("parity", b, "--backends", "onnxruntime", "--device", "cpu", "--data", data, "--json", pj)
    assert json.loads(pj.read_text())["ok"]
    from forgetrt.runtime import Runtime, RuntimeConfig

    xs = np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)
    with Runtime.load(b, RuntimeConfig(backend="onnxruntime", device="cpu")) as rt:
        got = rt.infer(xs).logits
    with torch.no_grad():
        np.testing.assert_allclose(got, net((torch.from_numpy(xs) - 0.5) / 0.25).numpy(), rtol=1e-4, atol=1e-4)
    out = _run(
        "unlearn-baseline",
        "--method",
        "ft",
        "--model",
        m,
        "--data",
        data,
        "--forget-classes",
        "0",
        "--out",
        tmp_path / "ft",
        ok=False,
    )
    assert "frozen graph" in out


def test_programs_that_cannot_serve_are_refused(tmp_path):
    from forgetrt.train.workflows import import_model

    static = _program(tmp_path / "static.pt2", _net(), batch_dynamic=False)
    with pytest.raises(InvalidInputError, match="dynamic batch"):
        import_model(None, None, tmp_path / "a", labels=CLASSES, image_size=32, program=static)
    ok = _program(tmp_path / "ok.pt2", _net())
    with pytest.raises(InvalidInputError, match=r"returns \(1, 3\).*for the 4 labels"):
        import_model(None, None, tmp_path / "b", labels=list("abcd"), image_size=32, program=ok)
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a zip")
    with pytest.raises(InvalidInputError, match="not a torch.export program"):
        import_model(None, None, tmp_path / "c", labels=CLASSES, image_size=32, program=junk)
    with pytest.raises(InvalidInputError, match="not both"):
        import_model("cifar-small", tmp_path / "w", tmp_path / "d", labels=CLASSES, image_size=32, program=ok)
    out = _run(
        "import-model",
        "--program",
        ok,
        "--arch",
        "cifar-small",
        "--image-size",
        32,
        "--labels",
        "a,b,c",
        "--out",
        tmp_path / "e",
        ok=False,
    )
    assert "--program replaces --arch" in out
    out = _run("import-model", "--image-size", 32, "--labels", "a,b,c", "--out", tmp_path / "f", ok=False)
    assert "give --arch and --weights, or --program" in out


def test_a_file_that_is_not_a_program_gives_one_clean_line(tmp_path):
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"PK\x03\x04 not really a zip")
    r = CliRunner().invoke(
        cli,
        ["import-model", "--program", str(junk), "--image-size", "8", "--labels", "a,b", "--out", str(tmp_path / "m")],
    )
    assert r.exit_code == 2 and "not a torch.export program" in r.output and "Traceback" not in r.output


def test_a_swapped_program_is_refused(tmp_path):
    """The graph is not in the weights' fingerprint: its file hash, recorded at import, is checked instead."""
    from forgetrt.runtime.errors import CorruptArtifactError
    from forgetrt.train.workflows import import_model

    net = _net()
    import_model(None, None, tmp_path / "m", labels=CLASSES, image_size=32, program=_program(tmp_path / "a.pt2", net))
    other = nn.Sequential(*list(net.children()))  # the same weights and names, another graph
    other[2] = nn.Tanh()
    _program(tmp_path / "b.pt2", other)
    (tmp_path / "m" / MODEL_PROGRAM).write_bytes((tmp_path / "b.pt2").read_bytes())
    with pytest.raises(CorruptArtifactError, match="does not match the program this folder was made from"):
        load_model(tmp_path / "m")
