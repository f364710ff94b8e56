"""The runtime on CUDA (skipped without a GPU): torch eager and CUDA-graph replay against the CPU
reference, bucket padding, heterogeneous rows, bank hot swap with and without recapture, and the
dynamic batcher feeding the graphs from many threads."""

import threading

import numpy as np
import pytest

from forgetrt.runtime import BackendUnavailableError, BatchingConfig, Runtime, RuntimeConfig

pytestmark = pytest.mark.gpu

# CUDA convolutions run in TF32 by default: compare against the fp32 CPU reference relative to the logit scale
REL = 1e-2


def _close(got, want, rel=REL):
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max())
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel} x logit scale {scale:.3g}"


def _images(rng, n):
    return rng.random((n, 1, 8, 8), dtype=np.float32)


@pytest.fixture(scope="module")
def graphs(digits_bundle):
    r = Runtime.load(
        digits_bundle,
        RuntimeConfig(
            backend="torch", device="cuda", batching=BatchingConfig(max_batch_size=64, max_queue_delay_us=500)
        ),
        {"cuda_graphs": True},
    )
    yield r
    r.close()


def test_eager_and_graphs_match_the_cpu_reference(digits_bundle, graphs, torch_reference):
    rng = np.random.default_rng(0)
    k = graphs.snapshot.k
    with Runtime.load(digits_bundle, RuntimeConfig(backend="torch", device="cuda"), {"cuda_graphs": False}) as eager:
        assert eager.describe()["backend"]["cuda_graphs"] is False
        for n in (1, 3, 8, 13, 64):  # 3 and 13 are padded up to their buckets
            x = _images(rng, n)
            c = rng.uniform(-1, 1, (n, k)).astype(np.float32)  # every row its own composition
            want = torch_reference(x, c)
            g = graphs.infer(x, coeffs=c).logits
            e = eager.infer(x, coeffs=c).logits
            _close(g, want)
            _close(e, want)
            _close(g, e, rel=1e-3)
    assert {1, 4, 8, 16, 64} <= set(graphs.describe()["backend"]["captured_buckets"])


def test_padding_rows_do_not_leak(graphs, torch_reference):
    rng = np.random.default_rng(1)
    big = _images(rng, 16)
    graphs.infer(big, ["forget-1"])  # fills the 16-bucket's buffers with other data
    x = _images(rng, 9)
    _close(graphs.infer(x, ["forget-2"]).logits, torch_reference(x, np.tile(np.eye(9)[2], (9, 1)).astype(np.float32)))


def test_hot_swap_same_k_and_new_k(digits_bundle, torch_reference):
    rng = np.random.default_rng(2)
    x = _images(rng, 4)
    with Runtime.load(digits_bundle, RuntimeConfig(backend="torch", device="cuda"), {"cuda_graphs": True}) as rt:
        before = rt.infer(x, ["forget-3"]).logits
        v = rng.uniform(-0.2, 0.2, (1, 8, 8)).astype(np.float32)
        st = rt.add_vector("forget-3", v, replace=True)  # same K: the captured graph reads the new bank
        res = rt.infer(x, ["forget-3"])
        assert res.bank_version == st.version
        m = np.array(st.matrix)
        _close(res.logits, torch_reference(x, np.tile(np.eye(9)[3], (4, 1)).astype(np.float32), matrix=m))
        assert np.abs(res.logits - before).max() > 1e-4
        st2 = rt.add_vector("extra", v)  # K grows: graphs are recaptured
        assert st2.k == 10
        res2 = rt.infer(x, {"extra": 1.0})
        c = np.zeros((4, 10), np.float32)
        c[:, 9] = 1
        _close(res2.logits, torch_reference(x, c, matrix=np.array(st2.matrix)))


def test_batcher_threads_feed_the_graphs(graphs, torch_reference):
    k = graphs.snapshot.k
    errors: list[str] = []

    def client(seed: int) -> None:
        rng = np.random.default_rng(100 + seed)
        for _ in range(40):
            n = int(rng.integers(1, 4))
            x = _images(rng, n)
            row = (rng.random(k) < 0.3).astype(np.float32)
            try:
                got = graphs.submit(x, coeffs=row).result(30).logits
                _close(got, torch_reference(x, np.tile(row, (n, 1))))
            except AssertionError as e:  # collected: pytest only sees the main thread's failures
                errors.append(str(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]


def test_onnxruntime_cuda_or_clear_error(digits_bundle, torch_reference):
    try:
        rt = Runtime.load(digits_bundle, RuntimeConfig(backend="onnxruntime", device="cuda"))
    except BackendUnavailableError as e:
        assert "CUDAExecutionProvider" in str(e)
        pytest.skip(f"onnxruntime-gpu not installed: {e}")
    with rt:
        x = _images(np.random.default_rng(3), 5)
        _close(rt.infer(x, "eu").logits, torch_reference(x, np.tile(np.eye(9)[3], (5, 1)).astype(np.float32)))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_graphs(digits_bundle, torch_reference, precision):
    rng = np.random.default_rng(4)
    with Runtime.load(
        digits_bundle, RuntimeConfig(backend="torch", device="cuda"), {"cuda_graphs": True, "precision": precision}
    ) as rt:
        assert rt.describe()["backend"]["precision"] == precision
        for n in (1, 5):
            x = _images(rng, n)
            c = rng.uniform(-1, 1, (n, rt.snapshot.k)).astype(np.float32)
            _close(rt.infer(x, coeffs=c).logits, torch_reference(x, c), rel=2e-2)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cudnn_fused_kernels_match_on_resnet18(dtype):
    """The real cuDNN conv+ReLU and conv+add+ReLU kernels (residual joins, moved shortcut biases) against
    the module as trained, in channels-last as the backend runs them."""
    import torch
    from test_torch_optimize import _model

    from forgetrt.runtime.backends.torch_optimize import optimize_classifier

    m = _model("resnet18-cifar").cuda()
    x = torch.rand(4, 3, 32, 32, device="cuda")
    with torch.no_grad():
        want = m(x).cpu().numpy()
        for mode, impl in (("bn", "reference"), ("cudnn", "cudnn")):
            opt = optimize_classifier(m, mode, impl=impl)
            mod = opt.module.to(memory_format=torch.channels_last).to(getattr(torch, dtype))
            z = (x + opt.offset).to(dtype=getattr(torch, dtype), memory_format=torch.channels_last)
            got = mod(z).float().cpu().numpy()
            _close(got, want, rel={"float32": REL, "float16": 2e-2, "bfloat16": 5e-2}[dtype])


def test_default_fuse_on_cuda_is_cudnn(graphs):
    d = graphs.describe()["backend"]
    assert d["fuse"] == "cudnn" and "fuse_fallback" not in d, d
    assert d["fused"]["conv_relu"] == 3


def test_graphs_of_the_module_as_trained(digits_bundle, torch_reference):
    rng = np.random.default_rng(5)
    with Runtime.load(
        digits_bundle, RuntimeConfig(backend="torch", device="cuda"), {"cuda_graphs": True, "fuse": "none"}
    ) as rt:
        assert rt.describe()["backend"]["fuse"] == "none"
        x = _images(rng, 3)
        c = rng.uniform(-1, 1, (3, rt.snapshot.k)).astype(np.float32)
        _close(rt.infer(x, coeffs=c).logits, torch_reference(x, c))
