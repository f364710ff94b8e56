"""The Runtime on the digits bundle (onnxruntime CPU and torch CPU): composition forms, heterogeneous
batching under load, validation, queue limits, deadlines, failure isolation, hot swap, shutdown."""

import asyncio
import threading
import time

import numpy as np
import pytest

from forgetrt.runtime import (
    BackendUnavailableError,
    BatchingConfig,
    DeadlineExceededError,
    EngineError,
    InvalidInputError,
    MismatchError,
    QueueFullError,
    Runtime,
    RuntimeClosedError,
    RuntimeConfig,
    UnknownNameError,
)

ATOL = 1e-5
# engines differ from the torch reference by float32 rounding: a few ulps, which at logits near 16 exceed
# ATOL alone (seen on an AVX2-only AMD EPYC); RTOL allows about 8 ulps of the value
RTOL = 1e-6


def _images(rng, n):
    return rng.random((n, 1, 8, 8), dtype=np.float32)


@pytest.fixture(scope="module")
def rt(digits_bundle):
    r = Runtime.load(
        digits_bundle,
        RuntimeConfig(
            backend="onnxruntime", device="cpu", batching=BatchingConfig(max_batch_size=64, max_queue_delay_us=1000)
        ),
    )
    yield r
    r.close()


def test_every_forget_form_matches_the_reference(rt, torch_reference):
    rng = np.random.default_rng(0)
    x = _images(rng, 3)
    k = rt.snapshot.k
    cases = [
        (None, np.zeros(k)),
        (["forget-3"], np.eye(k)[3]),
        ({"forget-0": 0.5, "forget-7": -1.0}, 0.5 * np.eye(k)[0] - np.eye(k)[7]),
        ("pair", np.eye(k)[0] + np.eye(k)[3]),
        (list(np.linspace(-1, 1, k)), np.linspace(-1, 1, k)),
    ]
    for forget, row in cases:
        want = torch_reference(x, np.tile(row, (3, 1)).astype(np.float32))
        for res in (rt.infer(x, forget), rt.submit(x, forget).result()):
            assert res.bank_version == 0 and res.logits.shape == (3, 10)
            np.testing.assert_allclose(res.logits, want, atol=ATOL, rtol=RTOL)
    per_image = rng.uniform(-1, 1, (3, k)).astype(np.float32)
    np.testing.assert_allclose(
        rt.infer(x, coeffs=per_image).logits, torch_reference(x, per_image), atol=ATOL, rtol=RTOL
    )


def test_onnxruntime_fast_call_matches_the_public_run(rt):
    """The backend calls the session's C++ run directly (no per-call wrapper checks): same logits as
    the public InferenceSession.run, for the bundle's own bank and a swapped-in bank feed."""
    be = rt.backends[0]
    assert rt.describe()["backend"]["fast_call"] is True
    rng = np.random.default_rng(7)
    x = _images(rng, 3)
    c = rng.uniform(-1, 1, (3, rt.snapshot.k)).astype(np.float32)
    for bank in (
        rt._state,
        rt._state.__class__(
            5,
            rt._state.names,
            rt._state.matrix * 0.5,
            rt._state.policies,
            rt._state.coeff_range,
            rt._state.mandatory,
            "test",
        ),
    ):
        feeds = be._feeds(x, c, bank)
        assert ("forget_bank" in feeds) == (bank.version != 0)
        np.testing.assert_array_equal(be._run(feeds)[0], be.session.run(None, feeds)[0])


def test_torch_backend_agrees(digits_bundle, torch_reference):
    with Runtime.load(digits_bundle, RuntimeConfig(backend="torch", device="cpu")) as trt:
        x = _images(np.random.default_rng(1), 5)
        np.testing.assert_allclose(
            trt.infer(x, "eu").logits, torch_reference(x, np.tile(np.eye(9)[3], (5, 1))), atol=ATOL, rtol=RTOL
        )


def test_torch_bf16_precision_and_precision_errors(digits_bundle, torch_reference):
    x = _images(np.random.default_rng(11), 6)
    want = torch_reference(x, np.tile(np.eye(9)[3], (6, 1)))
    with Runtime.load(digits_bundle, RuntimeConfig(backend="torch", device="cpu"), {"precision": "bf16"}) as r:
        assert r.describe()["backend"]["precision"] == "bf16"
        got = r.infer(x, "eu").logits
        assert got.dtype == np.float32
        err = np.abs(got - want).max()
        assert 0 < err <= 2e-2 * np.abs(want).max()  # bf16 really ran (not bit-identical), within fp16-class tolerance
    with pytest.raises(BackendUnavailableError, match="fp16' needs CUDA"):
        Runtime.load(digits_bundle, RuntimeConfig(backend="torch", device="cpu"), {"precision": "fp16"})
    with pytest.raises(UnknownNameError, match="unknown precision 'int4'"):
        Runtime.load(digits_bundle, RuntimeConfig(backend="torch", device="cpu"), {"precision": "int4"})


def test_concurrent_heterogeneous_requests_match_single_request_reference(rt, torch_reference):
    """2,000 requests from 16 threads, each a random composition (none, mandatory-only, policies, names,
    weights, raw rows): every response equals the directly computed reference; no cross-talk."""
    k = rt.snapshot.k
    names = list(rt.snapshot.names)
    results = []
    errors = []
    lock = threading.Lock()

    def client(seed):
        rng = np.random.default_rng(seed)
        for _ in range(125):
            x = _images(rng, int(rng.integers(1, 4)))
            kind = rng.integers(0, 5)
            if kind == 0:
                forget, row = None, np.zeros(k)  # mandatory only
            elif kind == 1:
                p = ["eu", "pair"][rng.integers(0, 2)]
                forget, row = p, (np.eye(k)[3] if p == "eu" else np.eye(k)[0] + np.eye(k)[3])
            elif kind == 2:
                pick = sorted(set(rng.integers(0, k, rng.integers(1, 4)).tolist()))
                forget, row = [names[i] for i in pick], np.eye(k)[pick].sum(0)
            elif kind == 3:
                w = rng.uniform(-2, 2, k)
                forget, row = dict(zip(names, w.tolist())), w
            else:
                row = rng.uniform(-2, 2, k)
                forget = row.tolist()
            try:
                fut = rt.submit(x, forget)
                fut.result(30)  # a closed-loop client: one request in flight per thread
                with lock:
                    results.append((x, row.astype(np.float32), fut))
            except Exception as e:  # noqa: BLE001
                errors.append(e)

    threads = [threading.Thread(target=client, args=(s,)) for s in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 2000
    batched = 0
    for x, row, fut in results:
        res = fut.result(timeout=30)
        batched += res.batch_images > x.shape[0]
        np.testing.assert_allclose(res.logits, torch_reference(x, np.tile(row, (len(x), 1))), atol=ATOL, rtol=RTOL)
    assert batched > 100  # requests really shared engine calls with other compositions


@pytest.mark.parametrize(
    "images, forget, err, msg",
    [
        (np.zeros((2, 1, 8, 8), np.float64), None, InvalidInputError, "float32"),
        (np.zeros((2, 3, 8, 8), np.float32), None, InvalidInputError, r"shape \[N, 1, 8, 8\]"),
        (np.zeros((0, 1, 8, 8), np.float32), None, InvalidInputError, "empty"),
        (np.full((1, 1, 8, 8), np.nan, np.float32), None, InvalidInputError, "NaN"),
        (np.full((1, 1, 8, 8), 1.5, np.float32), None, InvalidInputError, r"pixels must lie in \[0.0, 1.0\]"),
        ([[0.0]], None, InvalidInputError, "numpy array"),
        (np.zeros((1, 1, 8, 8), np.float32), ["forget-9"], UnknownNameError, "unknown vector 'forget-9'"),
        (np.zeros((1, 1, 8, 8), np.float32), "asia", UnknownNameError, "unknown policy 'asia'"),
        (np.zeros((1, 1, 8, 8), np.float32), {"forget-1": 3.0}, InvalidInputError, "coefficient range"),
        (np.zeros((65, 1, 8, 8), np.float32), None, InvalidInputError, "maximum batch size 64"),
    ],
)
def test_bad_requests_get_typed_errors(rt, images, forget, err, msg):
    with pytest.raises(err, match=msg):
        rt.submit(images, forget)
    if not (isinstance(images, np.ndarray) and len(images) == 65):
        with pytest.raises(err, match=msg):
            rt.infer(images, forget)
    x = np.zeros((1, 1, 8, 8), np.float32)
    assert rt.infer(x).logits.shape == (1, 10)  # still serving


def test_clamp_policy_and_coeffs_errors(digits_bundle, torch_reference):
    with Runtime.load(digits_bundle, RuntimeConfig(backend="onnxruntime", device="cpu", pixel_policy="clamp")) as r:
        x = np.full((1, 1, 8, 8), 1.7, np.float32)
        np.testing.assert_allclose(
            r.infer(x).logits, torch_reference(np.ones_like(x), np.zeros((1, 9), np.float32)), atol=ATOL, rtol=RTOL
        )
        with pytest.raises(InvalidInputError, match="coeffs must have shape"):
            r.infer(x, coeffs=np.zeros(3))
        with pytest.raises(InvalidInputError, match="either forget or coeffs"):
            r.infer(x, ["forget-1"], coeffs=np.zeros(9))
    with pytest.raises(UnknownNameError, match="pixel policy"):
        Runtime.load(digits_bundle, RuntimeConfig(backend="onnxruntime", device="cpu", pixel_policy="wrap"))
    with pytest.raises(UnknownNameError, match="unknown backend 'tvm'"):
        Runtime.load(digits_bundle, RuntimeConfig(backend="tvm", device="cpu"))


@pytest.mark.skipif(__import__("importlib").util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_unavailable_backend_is_an_error_not_a_fallback(digits_bundle):
    with pytest.raises(BackendUnavailableError, match="tensorrt"):
        Runtime.load(digits_bundle, RuntimeConfig(backend="tensorrt", device="cpu"))


def test_queue_full_deadline_and_shutdown(digits_bundle):
    from forgetrt.runtime import BatchingConfig, RuntimeConfig
    from forgetrt.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from forgetrt.runtime.bundle import Bundle

    gate = threading.Event()

    class Gated(OnnxRuntimeBackend):  # the real backend, held at a gate so the queue can fill
        def _infer(self, images, coeffs, bank):
            gate.wait(10)
            return super()._infer(images, coeffs, bank)

    b = Bundle.load(digits_bundle)
    rt = Runtime(
        b,
        [Gated(b, "cpu")],
        RuntimeConfig(batching=BatchingConfig(max_batch_size=1, max_queue=4, max_queue_delay_us=0)),
    )
    x = np.zeros((1, 1, 8, 8), np.float32)
    first = rt.submit(x)  # taken by the worker, blocked at the gate
    time.sleep(0.2)
    late = rt.submit(x, deadline_ms=1)
    queued = [rt.submit(x) for _ in range(3)]
    with pytest.raises(QueueFullError, match="queue is full"):
        rt.submit(x)
    time.sleep(0.05)
    gate.set()
    assert first.result(5).logits.shape == (1, 10)
    with pytest.raises(DeadlineExceededError):
        late.result(5)
    for f in queued:
        assert f.result(5).bank_version == 0
    gate.clear()
    blocked = rt.submit(x)
    time.sleep(0.1)
    pending = [rt.submit(x) for _ in range(3)]
    threading.Timer(0.3, gate.set).start()
    rt.close(drain=False)
    assert blocked.result(5).logits.shape == (1, 10)  # already running: completes
    for f in pending:  # queued: failed, never left pending
        with pytest.raises(RuntimeClosedError):
            f.result(5)
    with pytest.raises(RuntimeClosedError):
        rt.submit(x)


def test_engine_failure_fails_only_its_batch(digits_bundle):
    from forgetrt.runtime import BatchingConfig, RuntimeConfig
    from forgetrt.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from forgetrt.runtime.bundle import Bundle

    class Flaky(OnnxRuntimeBackend):  # the real backend, failing on batches holding a marked image
        def _infer(self, images, coeffs, bank):
            if (images[:, 0, 0, 0] == 0.25).any():
                raise RuntimeError("simulated device fault")
            return super()._infer(images, coeffs, bank)

    b = Bundle.load(digits_bundle)
    with Runtime(
        b, [Flaky(b, "cpu")], RuntimeConfig(batching=BatchingConfig(max_batch_size=1, max_queue_delay_us=0))
    ) as rt:
        good = np.zeros((1, 1, 8, 8), np.float32)
        bad = good.copy()
        bad[0, 0, 0, 0] = 0.25
        futs = [rt.submit(bad if i == 2 else good) for i in range(5)]
        for i, f in enumerate(futs):
            if i == 2:
                with pytest.raises(EngineError, match="simulated device fault"):
                    f.result(5)
            else:
                assert f.result(5).logits.shape == (1, 10)


def test_async_api(rt, torch_reference):
    x = _images(np.random.default_rng(3), 2)

    async def main():
        return await asyncio.gather(*(rt.infer_async(x, ["forget-1"]) for _ in range(8)))

    for r in asyncio.run(main()):
        np.testing.assert_allclose(r.logits, torch_reference(x, np.tile(np.eye(9)[1], (2, 1))), atol=ATOL, rtol=RTOL)


def test_hot_swap_under_load(digits_bundle, digits_bank, torch_reference):
    """8 threads keep sending while vectors are replaced, added, removed and a whole bank reloaded:
    zero failures, and every response matches the bank version it reports."""

    rt = Runtime.load(
        digits_bundle,
        RuntimeConfig(backend="onnxruntime", device="cpu", batching=BatchingConfig(max_queue_delay_us=500)),
    )
    versions = {0: (rt.snapshot.names, np.array(rt.snapshot.matrix))}
    stop = threading.Event()
    out, errors = [], []

    def client(seed):
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            x = _images(rng, 1)
            try:
                bank = rt.snapshot
                forget = {bank.names[0]: 1.0, bank.names[-1]: -0.5}
                out.append((x, forget, rt.submit(x, forget)))
            except Exception as e:  # noqa: BLE001
                errors.append(e)
            time.sleep(0.001)

    threads = [threading.Thread(target=client, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    rng = np.random.default_rng(9)
    try:
        time.sleep(0.2)
        st = rt.add_vector("extra", rng.normal(0, 0.1, (1, 8, 8)).astype(np.float32))
        versions[st.version] = (st.names, np.array(st.matrix))
        time.sleep(0.2)
        st = rt.add_vector("forget-0", rng.normal(0, 0.1, (1, 8, 8)).astype(np.float32), replace=True)
        versions[st.version] = (st.names, np.array(st.matrix))
        time.sleep(0.2)
        # a whole bank, in another order and with fewer vectors (K changes; the policies' vectors stay)
        st = rt.reload_bank(digits_bank[0], vectors=["forget-5", "forget-3", "forget-0"])
        versions[st.version] = (st.names, np.array(st.matrix))
        time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join()
        rt.close()
    assert not errors
    seen = set()
    for x, forget, fut in out:
        res = fut.result(10)
        names, matrix = versions[res.bank_version]
        seen.add(res.bank_version)
        row = np.array([forget.get(n, 0.0) for n in names], np.float32)
        np.testing.assert_allclose(res.logits, torch_reference(x, row, matrix), atol=ATOL, rtol=RTOL)
    assert seen == set(versions), (seen, set(versions))


def test_hot_swap_errors(digits_bundle, digits_model_dir, tmp_path):
    from forgetrt.train.data import ForgetSpec
    from forgetrt.train.recipes import VectorRecipe
    from forgetrt.train.workflows import train_model, train_vector

    with Runtime.load(digits_bundle, RuntimeConfig(backend="onnxruntime", device="cpu")) as rt:
        with pytest.raises(InvalidInputError, match="shape"):
            rt.add_vector("x", np.zeros((3, 8, 8), np.float32))
        with pytest.raises(InvalidInputError, match="mandatory"):
            rt.add_vector("forget-9", np.zeros((1, 8, 8), np.float32))
        with pytest.raises(InvalidInputError, match="already served"):
            rt.add_vector("forget-1", np.zeros((1, 8, 8), np.float32))
        with pytest.raises(MismatchError, match="policy would dangle"):
            rt.remove_vector("forget-3")  # policy 'eu' uses it
        with pytest.raises(UnknownNameError):
            rt.remove_policy("nope")
        rt.remove_policy("eu")
        rt.remove_policy("pair")
        assert rt.remove_vector("forget-3").version == 3
        train_model("digits-cnn", "digits", tmp_path / "other", epochs=1, seed=3, device="cpu")
        train_vector(
            tmp_path / "other",
            "digits",
            tmp_path / "ob",
            {"v": ForgetSpec(classes=(1,))},
            VectorRecipe(epochs=1),
            device="cpu",
            evaluate_after=False,
        )
        with pytest.raises(MismatchError, match="fingerprint"):
            rt.reload_bank(tmp_path / "ob")
        assert rt.snapshot.version == 3  # nothing changed by the refused reloads
