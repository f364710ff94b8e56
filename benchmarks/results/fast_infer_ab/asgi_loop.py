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

batching = BatchingConfig(max_batch_size=64, inline_max_us=1000)
rt = Runtime.load(
    "forgetrt-demo/bundle", RuntimeConfig(backend="onnxruntime", device="cpu", batching=batching), {"threads": 1}
)
spec = rt.iospec
x = np.random.default_rng(0).uniform(0, 1, (1, *spec.shape)).astype(np.float32)
h, body = rest_binary_request(spec.image_name, spec.output_name, x, rt.snapshot.names[0])
hl = next(v for k, v in h.items() if k.lower() == HEADER_LEN)
app = create_app(rt, "m")
headers = [
    (HEADER_LEN.lower().encode(), hl.encode()),
    (b"content-length", str(len(body)).encode()),
    (b"host", b"x"),
    (b"content-type", b"application/octet-stream"),
]
scope = {
    "type": "http",
    "asgi": {"version": "3.0"},
    "http_version": "1.1",
    "method": "POST",
    "scheme": "http",
    "path": "/v2/models/m/infer",
    "raw_path": b"/v2/models/m/infer",
    "query_string": b"",
    "root_path": "",
    "headers": headers,
    "client": ("127.0.0.1", 1),
    "server": ("127.0.0.1", 2),
}


async def once() -> None:
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    status = {}

    async def send(msg):
        if msg["type"] == "http.response.start":
            status["code"] = msg["status"]

    await app(dict(scope), receive, send)
    assert status["code"] == 200


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
