"""The whole ASGI app (create_app over the digits bundle) called in a loop with no network: µs per request.
Run from the repository root; with an argument (a pstats sort key) it also prints a cProfile of the loop."""

import asyncio
import cProfile
import pstats
import sys
import time

import numpy as np

from forgetrt.runtime import BatchingConfig, Runtime, RuntimeConfig
from forgetrt.runtime.bench_remote import rest_binary_request
from forgetrt.runtime.server import HEADER_LEN, create_app

sys.path.insert(0, "benchmarks")
from request_breakdown import asgi_call  # noqa: E402

batching = BatchingConfig(max_batch_size=64, inline_max_us=1000)
rt = Runtime.load(
    "forgetrt-demo/bundle", RuntimeConfig(backend="onnxruntime", device="cpu", batching=batching), {"threads": 1}
)
spec = rt.iospec
x = np.random.default_rng(0).uniform(0, 1, (1, *spec.shape)).astype(np.float32)
h, body = rest_binary_request(spec.image_name, spec.output_name, x, rt.snapshot.names[0])
hl = next(v for k, v in h.items() if k.lower() == HEADER_LEN)
app = create_app(rt, "m")
once = asgi_call(app, body, hl)  # (2026-11-28 runs used an inline copy that also sent host and content-type)


async def many(n: int) -> None:
    for _ in range(n):
        await once()


loop = asyncio.new_event_loop()
loop.run_until_complete(many(500))
N = 5000
t = time.perf_counter()
loop.run_until_complete(many(N))
print("us/req", (time.perf_counter() - t) / N * 1e6)
if len(sys.argv) > 1:
    pr = cProfile.Profile()
    pr.enable()
    loop.run_until_complete(many(N))
    pr.disable()
    pstats.Stats(pr).sort_stats(sys.argv[1]).print_stats(40)
rt.close()
