"""The CLI end to end on digits (few epochs: these test plumbing and errors, the bars live in
tests/train), plus one typed, clean error per kind of bad input."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from forgetrt.tools.cli import cli


def run(*args, ok=True):
    r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert r.exit_code == 0, r.output
    return r


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """A 3-epoch digits model and a bank with two 2-epoch class vectors."""
    d = tmp_path_factory.mktemp("cli")
    run(
        "train-model",
        "--arch",
        "digits-cnn",
        "--data",
        "digits",
        "--epochs",
        "3",
        "--out",
        d / "model",
        "--device",
        "cpu",
    )
    run(
        "train-vector",
        "--model",
        d / "model",
        "--each-class",
        "--classes",
        "0,3",
        "--bank",
        d / "bank",
        "--preset",
        "digits",
        "--epochs",
        "2",
    )
    return d


def test_train_vector_and_bank_listing(quick):
    out = run("bank", quick / "bank").output
    assert "forget-0" in out and "forget-3" in out and "2 vectors" in out
    r = run(
        "train-vector",
        "--model",
        quick / "model",
        "--forget-fraction",
        "0.1",
        "--seed",
        "1",
        "--bank",
        quick / "bank",
        "--name",
        "rand10",
        "--epochs",
        "1",
        "--lr",
        "0.1",
        "--beta",
        "4",
    )
    assert "rand10" in r.output and "UA" in r.output
    man = json.loads((quick / "bank" / "manifest.json").read_text())
    e = man["vectors"]["rand10"]
    assert e["forgets"] == {"kind": "fraction", "fraction": 0.1, "seed": 1}
    assert e["recipe"]["lr"] == 0.1 and e["recipe"]["beta"] == 4.0 and e["recipe"]["epochs"] == 1
    assert {"UA", "RA", "TA", "MIA_efficacy"} <= set(e["metrics"])


def test_compose_fixed_and_learned(quick, tmp_path):
    bank = tmp_path / "bank"
    shutil.copytree(quick / "bank", bank)
    r = run("compose", "--bank", bank, "--name", "both", "--weights", "forget-0=1,forget-3=0.5")
    assert json.loads(r.stdout)["forgets"]["classes"] == [0, 3]
    r = run(
        "compose",
        "--bank",
        bank,
        "--name",
        "learned",
        "--learn",
        "--model",
        quick / "model",
        "--target-classes",
        "0,3",
        "--epochs",
        "1",
        "--basis",
        "forget-0,forget-3",
    )
    res = json.loads(r.stdout)
    assert set(res["coefficients"]) == {"forget-0", "forget-3"}
    r = run(
        "compose",
        "--bank",
        bank,
        "--name",
        "refined",
        "--refine",
        "--model",
        quick / "model",
        "--target-classes",
        "0,3",
    )
    assert json.loads(r.stdout)["method"] == "refine"
    man = json.loads((bank / "manifest.json").read_text())
    assert man["vectors"]["both"]["composition"] == {"forget-0": 1.0, "forget-3": 0.5}
    assert man["vectors"]["learned"]["recipe"]["method"] == "learned"
    refined = man["vectors"]["refined"]["recipe"]
    # the composition budget by default: a tenth of the preset's steps (paper: 10 epochs -> refine's two
    # epochs at half their steps each), gamma 0.3
    assert refined["method"] == "refined"
    assert (refined["epochs"], refined["epoch_share"], refined["gamma"]) == (2, 0.5, 0.3)
    # --epochs alone means whole epochs (the share the default chose does not linger)
    run("compose", "--bank", bank, "--name", "r2", "--refine", "--model", quick / "model", "--target-classes", "0,3",
        "--epochs", "2")  # fmt: skip
    r2 = json.loads((bank / "manifest.json").read_text())["vectors"]["r2"]["recipe"]
    assert (r2["epochs"], r2["epoch_share"], r2["gamma"]) == (2, 1.0, 0.3)


def test_eval_json_reference_and_baselines(quick, tmp_path):
    ref = tmp_path / "retrain.json"
    run(
        "unlearn-baseline",
        "--method",
        "retrain",
        "--model",
        quick / "model",
        "--forget-classes",
        "3",
        "--out",
        tmp_path / "retrain",
        "--epochs",
        "2",
    )
    run("eval", "--model", tmp_path / "retrain", "--json", ref)
    r = json.loads(ref.read_text())
    assert r["forgets"]["classes"] == [3] and r["UA"] > 50  # never saw class 3
    out = tmp_path / "v.json"
    run(
        "eval",
        "--model",
        quick / "model",
        "--bank",
        quick / "bank",
        "--vector",
        "forget-3",
        "--json",
        out,
        "--reference",
        ref,
    )
    v = json.loads(out.read_text())
    for k in ("UA", "RA", "TA", "TA_forgotten", "MIA_efficacy", "avg_gap"):
        assert 0.0 <= v[k] <= 100.0, k
    run("eval", "--model", quick / "model", "--bank", quick / "bank", "--weights", "forget-0=1,forget-3=1")
    for method in ("ft", "ga", "rl"):
        r = run(
            "unlearn-baseline",
            "--method",
            method,
            "--model",
            quick / "model",
            "--forget-classes",
            "3",
            "--out",
            tmp_path / method,
            "--epochs",
            "1",
        )
        assert method in r.output
        rec = json.loads((tmp_path / method / "model.json").read_text())
        assert rec["unlearning"]["method"] == method and rec["unlearning"]["forgets"]["classes"] == [3]


def test_other_model_bank_is_refused(quick, tmp_path):
    run(
        "train-model",
        "--arch",
        "digits-cnn",
        "--epochs",
        "1",
        "--seed",
        "7",
        "--out",
        tmp_path / "other",
        "--device",
        "cpu",
    )
    r = run("eval", "--model", tmp_path / "other", "--bank", quick / "bank", "--vector", "forget-0", ok=False)
    assert r.exit_code == 3 and "fingerprint" in r.output and "Traceback" not in r.output
    r = run(
        "train-vector",
        "--model",
        tmp_path / "other",
        "--forget-classes",
        "1",
        "--bank",
        quick / "bank",
        "--name",
        "x",
        "--epochs",
        "1",
        ok=False,
    )
    assert r.exit_code == 3 and "trained for the model" in r.output


@pytest.mark.parametrize(
    "args, code, msg",
    [
        (["train-model", "--arch", "vgg", "--out", "{t}/m"], 2, "unknown arch 'vgg'"),
        (["train-model", "--arch", "digits-cnn", "--data", "mnist", "--out", "{t}/m"], 2, "unknown data spec kind"),
        (
            ["train-model", "--arch", "cifar-small", "--data", "cifar10:{t}/none.tar.gz", "--out", "{t}/m"],
            2,
            "not found",
        ),
        (
            ["train-vector", "--model", "{q}/model", "--forget-classes", "11", "--bank", "{t}/b", "--name", "x"],
            2,
            "unknown class 11",
        ),
        (
            ["train-vector", "--model", "{q}/model", "--forget-fraction", "1.5", "--bank", "{t}/b", "--name", "x"],
            2,
            "fraction must be in (0, 1)",
        ),
        (["train-vector", "--model", "{q}/model", "--forget-classes", "1", "--bank", "{t}/b"], 2, "--name is required"),
        (
            [
                "train-vector",
                "--model",
                "{q}/model",
                "--forget-indices",
                "{t}/empty.txt",
                "--bank",
                "{t}/b",
                "--name",
                "x",
            ],
            2,
            "empty",
        ),
        (
            [
                "train-vector",
                "--model",
                "{q}/model",
                "--forget-classes",
                "0,1,2,3,4,5,6,7,8,9",
                "--bank",
                "{t}/b",
                "--name",
                "x",
            ],
            2,
            "no training sample to retain",
        ),
        (
            [
                "train-vector",
                "--model",
                "{q}/model",
                "--forget-classes",
                "1",
                "--bank",
                "{q}/bank",
                "--name",
                "forget-0",
            ],
            2,
            "already exist",
        ),
        (
            ["train-vector", "--model", "{t}/nomodel", "--forget-classes", "1", "--bank", "{t}/b", "--name", "x"],
            3,
            "model folder not found",
        ),
        (["eval", "--model", "{q}/model", "--bank", "{q}/bank", "--vector", "nope"], 2, "unknown vector 'nope'"),
        (["eval", "--model", "{q}/model"], 2, "cannot tell what was forgotten"),
        (["eval", "--model", "{q}/model", "--bank", "{t}/nobank", "--vector", "x"], 3, "not found"),
        (["compose", "--bank", "{q}/bank", "--name", "c", "--weights", "forget-0=abc"], 2, "must be a number"),
        (["compose", "--bank", "{q}/bank", "--name", "c", "--weights", "forget-0=1,zzz=1"], 2, "unknown vector 'zzz'"),
        (["compose", "--bank", "{q}/bank", "--name", "c"], 2, "exactly one of --weights, --learn or --refine"),
        (
            ["unlearn-baseline", "--method", "xx", "--model", "{q}/model", "--forget-classes", "1", "--out", "{t}/o"],
            2,
            "Invalid value",
        ),
    ],
)
def test_bad_input_gets_a_clean_typed_error(quick, tmp_path, args, code, msg):
    (tmp_path / "empty.txt").write_text("")
    argv = [a.format(q=quick, t=tmp_path) for a in args]
    r = CliRunner().invoke(cli, argv)
    assert r.exit_code == code, r.output
    assert msg in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
    assert not (tmp_path / "b").exists()  # nothing half-written


def test_corrupt_bank_files(quick, tmp_path):
    bank = tmp_path / "bank"
    shutil.copytree(quick / "bank", bank)
    (bank / "vectors.safetensors").write_bytes(b"\x00" * 64)
    r = run("bank", bank, ok=False)
    assert r.exit_code == 3 and "sha256" in r.output
    (bank / "manifest.json").write_text("{not json")
    r = run("bank", bank, ok=False)
    assert r.exit_code == 3 and "not valid JSON" in r.output


def test_help_lists_every_command():
    out = run("--help").output
    for c in ("train-model", "train-vector", "compose", "eval", "unlearn-baseline", "demo", "bank", "models"):
        assert c in out
    assert "digits-cnn" in run("models").output


def test_preset_choices_are_the_library_presets():
    from forgetrt.train.recipes import PRESETS

    opt = next(p for p in cli.commands["train-vector"].params if p.name == "preset")
    assert list(opt.type.choices) == list(PRESETS)


def test_backends_listing_with_and_without_a_bundle(digits_bundle):
    out = run("backends").output
    assert all(n in out for n in ("onnxruntime", "torch", "tensorrt")) and "options: precision, fuse" in out
    out = run("backends", digits_bundle, "--device", "cpu").output
    assert "on cpu: available" in out and "TensorRT is not installed" in out


def test_coefficient_range_is_parsed_and_checked(quick, tmp_path):
    r = CliRunner().invoke(
        cli,
        [
            "export",
            "onnx",
            "--model",
            str(quick / "model"),
            "--bank",
            str(quick / "bank"),
            "--out",
            str(tmp_path / "b"),
            "--coeff-range",
            "2,1",
        ],
    )
    assert r.exit_code == 2 and "finite LO <= HI" in r.output and not (tmp_path / "b").exists()


def test_torchvision_arch_without_torchvision_names_the_extra(tmp_path):
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed here (tests/vision covers it)")
    from safetensors.numpy import save_file

    w = tmp_path / "w.safetensors"
    save_file({"x": np.zeros(1, np.float32)}, str(w))
    r = CliRunner().invoke(
        cli,
        [
            "import-model",
            "--arch",
            "torchvision:resnet18",
            "--weights",
            str(w),
            "--image-size",
            "32",
            "--labels",
            "a,b",
            "--out",
            str(tmp_path / "m"),
        ],
    )
    assert r.exit_code == 4 and "needs the 'vision' extra" in r.output and "forgetrt[vision]" in r.output, r.output
