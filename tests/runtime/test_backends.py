"""The backend registry and the base class's invariants: one entry per backend feeds auto, the CLI and
parity; options are typed; the base owns limits, the call lock and errors; a backend can refuse a bank
before a hot swap is published."""

import dataclasses
import threading
import time

import numpy as np
import pytest

from forgetrt.runtime import BatchingConfig, Runtime, RuntimeConfig
from forgetrt.runtime import backends as reg
from forgetrt.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend, OnnxRuntimeOptions
from forgetrt.runtime.backends.torch_backend import TorchOptions
from forgetrt.runtime.bundle import Bundle
from forgetrt.runtime.errors import (
    BackendUnavailableError,
    EngineError,
    InvalidInputError,
    MismatchError,
    UnknownNameError,
)


@pytest.fixture
def bundle(digits_bundle):
    return Bundle.load(digits_bundle)


def _register(monkeypatch, cls, name, **changes):
    entry = dataclasses.replace(reg.get_backend("onnxruntime"), name=name, factory=cls, **changes)
    monkeypatch.setitem(reg._REGISTRY, name, entry)
    return entry


def test_registry_lists_the_builtin_backends_with_typed_options():
    assert reg.backend_names() == ("onnxruntime", "torch", "tensorrt")
    for e in reg.list_backends():
        assert dataclasses.is_dataclass(e.options) and e.description and callable(e.available)
    assert reg.make_options("torch", {"precision": "bf16"}) == TorchOptions(precision="bf16")
    assert reg.make_options("onnxruntime", None) == OnnxRuntimeOptions()
    with pytest.raises(
        InvalidInputError, match="backend 'onnxruntime' takes no option 'fuse' \\(its options: threads\\)"
    ):
        reg.make_options("onnxruntime", {"fuse": "bn"})
    with pytest.raises(UnknownNameError, match="unknown precision 'int4'"):
        reg.make_options("torch", {"precision": "int4"})
    with pytest.raises(InvalidInputError, match="threads must be >= 1"):
        reg.make_options("onnxruntime", {"threads": 0})
    with pytest.raises(InvalidInputError, match="already registered"):
        reg.register_backend(reg.get_backend("torch"))


def test_auto_follows_rank_and_availability(bundle, monkeypatch):
    assert reg.choose_backend(bundle, "cpu") == "onnxruntime"  # rank 20 on CPU beats torch's 10
    _register(monkeypatch, OnnxRuntimeBackend, "fancy", rank={"cpu": 99}, available=lambda b, d, o: "not today")
    assert reg.choose_backend(bundle, "cpu") == "onnxruntime"  # unavailable entries are passed over
    _register(monkeypatch, OnnxRuntimeBackend, "fancy", rank={"cpu": 99})
    assert reg.choose_backend(bundle, "cpu") == "fancy"
    assert reg.create_backend("auto", bundle, "cpu").name == "fancy"  # the registry's name, not the class's
    # auto passes over backends that do not take the options given, or cannot run with them
    assert reg.choose_backend(bundle, "cpu", {"precision": "bf16"}) == "torch"
    with pytest.raises(BackendUnavailableError, match="precision 'fp16' needs CUDA"):
        reg.choose_backend(bundle, "cpu", {"precision": "fp16"})
    with pytest.raises(BackendUnavailableError, match="backend 'tensorrt' cannot run on cpu"):
        reg.create_backend("tensorrt", bundle, "cpu")


def test_every_instance_is_built_by_the_entry_auto_chose(digits_bundle, monkeypatch):
    class Plugin(OnnxRuntimeBackend):
        name = "Plugin"  # a class name that differs from the registry's

    _register(monkeypatch, Plugin, "plugin", rank={"cpu": 99})
    with Runtime.load(digits_bundle, RuntimeConfig(device="cpu", batching=BatchingConfig(instances=2))) as rt:
        assert [type(b).__name__ for b in rt.backends] == ["Plugin", "Plugin"] and rt.backend_name == "plugin"


def test_a_new_backend_reaches_the_cli_choices():
    import subprocess
    import sys

    code = (
        "import dataclasses; from forgetrt.runtime import backends as reg;"
        "reg.register_backend(dataclasses.replace(reg.get_backend('onnxruntime'), name='plugin', rank={}));"
        "from forgetrt.tools.cli import cli;"
        "print([p.type.choices for p in cli.commands['serve'].params if p.name == 'backend'][0])"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and "'plugin'" in r.stdout, r.stdout + r.stderr


def test_base_class_owns_output_checks_and_engine_errors(bundle, monkeypatch):
    class WrongShape(OnnxRuntimeBackend):
        def _infer(self, images, coeffs, bank):
            return super()._infer(images, coeffs, bank)[:, :3]

    class Crashing(OnnxRuntimeBackend):
        def _infer(self, images, coeffs, bank):
            raise ZeroDivisionError("boom")

    x = np.zeros((2, 1, 8, 8), np.float32)
    for cls, msg in (
        (WrongShape, r"returned logits \(2, 3\), expected \(2, 10\)"),
        (Crashing, "failed on a batch of 2 images: ZeroDivisionError"),
    ):
        with Runtime(bundle, [cls(bundle, "cpu")]) as rt:
            with pytest.raises(EngineError, match=msg):
                rt.infer(x)
            with pytest.raises(EngineError, match=msg):  # through the batcher: the same typed error
                rt.submit(x).result(10)
    b = OnnxRuntimeBackend(bundle, "cpu")
    b.max_batch_size = 4
    with pytest.raises(InvalidInputError, match="max_batch_size 64 exceeds the engine's maximum batch 4"):
        Runtime(bundle, [b])  # the default batching config asks for more than the engine takes
    with Runtime(bundle, [b], RuntimeConfig(batching=BatchingConfig(max_batch_size=4))) as rt:
        with pytest.raises(InvalidInputError, match="exceeds the onnxruntime engine's maximum 4"):
            rt.infer(np.zeros((5, 1, 8, 8), np.float32))  # the direct path meets the engine's own limit


def test_base_class_serializes_a_backend_that_is_not_thread_safe(bundle):
    active, peak = [0], [0]
    lock = threading.Lock()

    class Single(OnnxRuntimeBackend):
        thread_safe = False

        def _infer(self, images, coeffs, bank):
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            time.sleep(0.005)
            with lock:
                active[0] -= 1
            return super()._infer(images, coeffs, bank)

    b = Single(bundle, "cpu")
    b.thread_safe = False  # the ORT backend's constructor sets it per device
    with Runtime(bundle, [b]) as rt:
        threads = [
            threading.Thread(target=lambda: [rt.infer(np.zeros((1, 1, 8, 8), np.float32)) for _ in range(5)])
            for _ in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert peak[0] == 1


def test_a_refused_bank_is_never_published(bundle, tmp_path):
    """check_bank runs on every instance before a swap is installed: a refusal leaves the old bank serving."""

    class Picky(OnnxRuntimeBackend):
        def check_bank(self, bank):
            super().check_bank(bank)
            if bank.k > 9:
                raise MismatchError("picky: at most 9 vectors")

    config = RuntimeConfig(batching=BatchingConfig(instances=2))
    with Runtime(bundle, [OnnxRuntimeBackend(bundle, "cpu"), Picky(bundle, "cpu")], config) as rt:
        before = rt.snapshot
        with pytest.raises(MismatchError, match="picky"):
            rt.add_vector("extra", np.zeros((1, 8, 8), np.float32))
        assert rt.snapshot is before and "extra" not in rt.snapshot.names
        rt.add_vector("forget-0", np.zeros((1, 8, 8), np.float32), replace=True)  # same K: accepted
        assert rt.snapshot.version == before.version + 1
        assert rt.infer(np.zeros((1, 1, 8, 8), np.float32), ["forget-0"]).bank_version == rt.snapshot.version


def test_constant_bank_graph_refuses_a_swap_up_front(bundle, tmp_path):
    """An ONNX graph whose bank is a constant cannot take a new bank: the swap is refused at once,
    where it used to be accepted and then fail every later request."""
    b = OnnxRuntimeBackend(bundle, "cpu")
    b._has_bank_input = False
    with Runtime(bundle, [b]) as rt:
        with pytest.raises(MismatchError, match="holds its bank as a constant"):
            rt.add_vector("forget-0", np.zeros((1, 8, 8), np.float32), replace=True)
        assert rt.snapshot.version == 0 and rt.infer(np.zeros((1, 1, 8, 8), np.float32), ["forget-1"]).logits.shape == (
            1,
            10,
        )


def test_instances_share_the_backend_auto_chose(digits_bundle):
    with Runtime.load(digits_bundle, RuntimeConfig(device="cpu", batching=BatchingConfig(instances=2))) as rt:
        assert [b.name for b in rt.backends] == ["onnxruntime", "onnxruntime"]
        assert rt.describe()["config"]["batching"]["instances"] == 2
    with pytest.raises(InvalidInputError, match="config must be a RuntimeConfig"):
        Runtime.load(digits_bundle, {"backend": "onnxruntime"})
    with pytest.raises(InvalidInputError, match="instances must be an integer >= 1"):
        BatchingConfig(instances=0)


def test_a_policy_change_is_not_a_bank_change(bundle):
    """Policies change the snapshot, not the matrix: an engine with a constant bank takes them."""
    b = OnnxRuntimeBackend(bundle, "cpu")
    b._has_bank_input = False
    with Runtime(bundle, [b]) as rt:
        s = rt.set_policy("mine", {"forget-1": 1.0})
        assert s.version == 1 and s.matrix_version == 0 and s.matrix is rt.snapshot.matrix
        want = rt.infer(np.zeros((1, 1, 8, 8), np.float32), ["forget-1"]).logits
        np.testing.assert_array_equal(rt.infer(np.zeros((1, 1, 8, 8), np.float32), "mine").logits, want)
        assert rt.remove_policy("mine").matrix_version == 0
    with Runtime(bundle, [OnnxRuntimeBackend(bundle, "cpu")]) as rt:
        assert rt.add_vector("forget-0", np.zeros((1, 8, 8), np.float32), replace=True).matrix_version == 1


def test_bundle_with_a_tensorrt_record_from_before_the_rename_loads(digits_bundle, tmp_path):
    import json
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(digits_bundle, copy)
    rec = json.loads((copy / "bundle.json").read_text())
    rec["tensorrt"] = {
        "fp16": True,
        "min_batch": 1,
        "opt_batch": 8,
        "max_batch": 64,
        "refittable": False,
        "tensorrt_version": "10",
    }
    (copy / "bundle.json").write_text(json.dumps(rec))
    assert Bundle.load(copy).manifest.tensorrt.max_batch_size == 64
