"""``forgetrt bench --url``: the in-process bench's grid, percentiles and JSON lines against a running server,
over KServe v2 REST (binary tensors, as ``tritonclient.http`` sends them) or gRPC (raw contents).

The load comes from ``client_processes`` spawned processes, each running its share of the closed-loop
clients as threads with one persistent connection each (``http.client`` / a gRPC channel per process), so
the generator is not one Python interpreter's GIL. Every request body is encoded before the clock starts.
All processes start together; a request counts if it starts inside the timed window (after the warm-up).
Errors are counted, not timed. The machine the numbers describe is the one running this command.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import platform
import sys
import threading
import time
import urllib.parse
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .bench import BenchConfig, latency_stats
from .errors import ArtifactError, InvalidInputError, unknown

__all__ = ["RemoteTarget", "run_remote_bench", "summarize_remote", "PROTOCOLS"]

PROTOCOLS = ("rest", "grpc")
_HEADER_LEN = "Inference-Header-Content-Length"


@dataclass(frozen=True)
class RemoteTarget:
    url: str  # http://host:port for REST, host:port (or grpc://host:port) for gRPC
    model: str
    protocol: str = "rest"
    client_processes: int = 2

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise unknown("protocol", self.protocol, PROTOCOLS)
        if self.client_processes < 1:
            raise InvalidInputError(f"client_processes must be >= 1, got {self.client_processes}")

    @property
    def hostport(self) -> tuple[str, int]:
        u = self.url if "://" in self.url else f"x://{self.url}"
        p = urllib.parse.urlsplit(u)
        if not p.hostname or not p.port:
            raise InvalidInputError(f"--url needs a host and a port, got {self.url!r}")
        return p.hostname, p.port


# ---------------------------------------------------------------------------------------------- discovery


def rest_binary_request(image: str, output: str, x: np.ndarray, forget: Any = None) -> tuple[dict[str, str], bytes]:
    """Headers and body of a KServe v2 REST request with the binary tensor extension: FP32 ``x`` as the
    ``image`` input, ``output`` asked for in binary, and the ``forget`` parameter when given."""
    raw = np.ascontiguousarray(x, np.float32).tobytes()
    head: dict[str, Any] = {
        "inputs": [
            {
                "name": image,
                "shape": list(x.shape),
                "datatype": "FP32",
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        "outputs": [{"name": output, "parameters": {"binary_data": True}}],
    }
    if forget:
        head["parameters"] = {"forget": forget}
    h = json.dumps(head).encode()
    return {_HEADER_LEN: str(len(h)), "Content-Type": "application/octet-stream"}, h + raw


def describe_model(target: RemoteTarget) -> dict[str, Any]:
    """Input shape, names and selectable vectors from the server's model configuration."""
    host, port = target.hostport
    try:
        if target.protocol == "rest":
            import http.client

            c = http.client.HTTPConnection(host, port, timeout=10)
            c.request("GET", f"/v2/models/{urllib.parse.quote(target.model)}/config")
            r = c.getresponse()
            body = r.read()
            if r.status != 200:
                raise ArtifactError(f"{target.url}: model config answered {r.status}: {body[:200]!r}")
            cfg = json.loads(body)
        else:
            import grpc
            from google.protobuf import json_format
            from tritonclient.grpc import service_pb2 as pb
            from tritonclient.grpc import service_pb2_grpc as pbg

            stub = pbg.GRPCInferenceServiceStub(grpc.insecure_channel(f"{host}:{port}"))
            res = stub.ModelConfig(pb.ModelConfigRequest(name=target.model), timeout=10)
            cfg = json_format.MessageToDict(res.config, preserving_proto_field_name=True)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"cannot reach {target.url} ({target.protocol}): {e}") from None
    except Exception as e:  # noqa: BLE001 - grpc.RpcError and friends: the server's answer, as a typed error
        raise ArtifactError(f"{target.url} ({target.protocol}): {str(e)[:300]}") from None
    params = cfg.get("parameters") or {}
    vectors = (params.get("vectors") or params.get("forgetrt_vectors") or {}).get("string_value", "")
    image, out = cfg["input"][0], cfg["output"][0]
    cr = (params.get("coeff_range") or {}).get("string_value", "")
    return {
        "image": image["name"],
        "shape": [int(d) for d in image["dims"]],
        "output": out["name"],
        "vectors": [v for v in vectors.split(",") if v],
        "coeff_range": [float(v) for v in cr.split(",")] if cr else None,
        "max_batch_size": int(cfg.get("max_batch_size", 0)),
        "platform": cfg.get("platform", ""),
    }


def _forget(names: list[str], active: int, mix: str, rng: np.random.Generator, cr) -> str | None:
    if active == 0:
        return None
    if mix == "homogeneous":
        return ",".join(names[:active])
    picks = rng.choice(len(names), active, replace=False)
    lo, hi = cr if cr else (-math.inf, math.inf)
    return ",".join(f"{names[j]}={min(max(float(w), lo), hi):.3f}" for j, w in zip(picks, rng.uniform(0.25, 1, active)))


def _bodies(target: RemoteTarget, model: dict, batch: int, active: int, mix: str, seed: int, n: int = 32) -> list:
    """``n`` encoded requests: (headers, body) for REST, serialized ModelInferRequest bytes for gRPC."""
    if active > len(model["vectors"]):
        raise InvalidInputError(f"{active} active vectors requested, the model has {len(model['vectors'])}")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.random((batch, *model["shape"]), dtype=np.float32)
        forget = _forget(model["vectors"], active, mix, rng, model["coeff_range"])
        raw = x.tobytes()
        if target.protocol == "rest":
            out.append(rest_binary_request(model["image"], model["output"], x, forget))
        else:
            from tritonclient.grpc import service_pb2 as pb

            req = pb.ModelInferRequest(
                model_name=target.model,
                inputs=[pb.ModelInferRequest.InferInputTensor(name=model["image"], datatype="FP32", shape=x.shape)],
                raw_input_contents=[raw],
            )
            if forget:
                req.parameters["forget"].string_param = forget
            out.append(req.SerializeToString())
    return out


# ---------------------------------------------------------------------------------------------- load


def _worker(args: tuple) -> dict[str, Any]:
    """One client process: ``threads`` closed loops from ``t_start``; times requests started in the window."""
    target, bodies, threads, t_start, warmup, duration, offset = args
    host, port = target.hostport
    w0, w1 = t_start + warmup, t_start + warmup + duration
    lat: list[float] = []
    errors = [0, ""]
    lock = threading.Lock()

    def closed_loop(i: int, send: Any) -> None:
        """Requests back to back until the window ends; ``send(body) -> (ok, why)``."""
        mine, j = [], offset + i
        while True:
            now = time.time()
            if now >= w1:
                break
            t = time.perf_counter()
            ok, why = send(bodies[j % len(bodies)])
            dt = time.perf_counter() - t
            if now >= w0:
                if ok:
                    mine.append(dt)
                else:
                    with lock:
                        errors[0] += 1
                        errors[1] = errors[1] or why
            j += threads
        with lock:
            lat.extend(mine)

    def rest_sender() -> Any:
        import http.client

        conn = [http.client.HTTPConnection(host, port, timeout=60)]  # one keep-alive connection per client
        path = f"/v2/models/{urllib.parse.quote(target.model)}/infer"

        def send(item: tuple) -> tuple[bool, str]:
            headers, body = item
            try:
                conn[0].request("POST", path, body, headers)
                r = conn[0].getresponse()
                r.read()
                return r.status == 200, "" if r.status == 200 else f"HTTP {r.status}"
            except OSError as e:
                conn[0].close()
                conn[0] = http.client.HTTPConnection(host, port, timeout=60)
                return False, repr(e)[:200]

        return send

    def grpc_sender(call: Any) -> Any:
        def send(body: bytes) -> tuple[bool, str]:
            try:
                call(body, timeout=60)
                return True, ""
            except Exception as e:  # noqa: BLE001 - grpc.RpcError: counted, with the first message kept
                return False, str(e)[:200]

        return send

    if target.protocol == "grpc":
        import grpc

        channel = grpc.insecure_channel(f"{host}:{port}")
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=lambda b: b,  # already serialized
            response_deserializer=lambda b: b,  # not parsed: the client's time is the server's answer
        )
        ts = [threading.Thread(target=closed_loop, args=(i, grpc_sender(call))) for i in range(threads)]
    else:
        ts = [threading.Thread(target=closed_loop, args=(i, rest_sender())) for i in range(threads)]
    time.sleep(max(0.0, t_start - time.time()))
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return {"latencies": lat, "errors": errors[0], "first_error": errors[1]}


def run_remote_bench(target: RemoteTarget, cfg: BenchConfig, *, log=None) -> list[dict[str, Any]]:
    """Every grid point of ``cfg`` against ``target``; one self-describing record per point."""
    model = describe_model(target)
    if model["max_batch_size"] and max(cfg.batches) > model["max_batch_size"]:
        raise InvalidInputError(
            f"batch sizes up to {max(cfg.batches)} exceed the server's max_batch_size {model['max_batch_size']}"
        )
    env = {
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "client": "this process's host",
    }
    ctx = mp.get_context("spawn")
    records = []
    with ctx.Pool(target.client_processes) as pool:
        for b in cfg.batches:
            for c in cfg.concurrency:
                for a in cfg.active_vectors:
                    bodies = _bodies(target, model, b, a, cfg.mix, cfg.seed + 1000 * b + a)
                    procs = min(target.client_processes, c)
                    shares = [c // procs + (1 if k < c % procs else 0) for k in range(procs)]
                    t_start = time.time() + 1.0  # every process has its threads ready by then
                    jobs = [
                        (target, bodies, shares[k], t_start, cfg.warmup, cfg.duration, sum(shares[:k]))
                        for k in range(procs)
                    ]
                    parts = pool.map(_worker, jobs)
                    lat = [x for p in parts for x in p["latencies"]]
                    errors = sum(p["errors"] for p in parts)
                    if not lat:
                        first = next((p["first_error"] for p in parts if p["first_error"]), "no answer")
                        raise ArtifactError(f"no request succeeded at batch {b}, concurrency {c}: {first}")
                    rec = {
                        "point": {
                            "batch": b,
                            "concurrency": c,
                            "active_vectors": a,
                            "mix": cfg.mix,
                            "path": target.protocol,
                        },
                        "config": {**asdict(cfg), "target": asdict(target), "model": model},
                        "env": env,
                        "requests": len(lat),
                        "errors": errors,
                        "first_error": next((p["first_error"] for p in parts if p["first_error"]), None),
                        "seconds": cfg.duration,
                        "latency": latency_stats(lat),
                        "throughput": {
                            "images_per_s": len(lat) * b / cfg.duration,
                            "requests_per_s": len(lat) / cfg.duration,
                        },
                    }
                    records.append(rec)
                    if log is not None:
                        log(
                            f"batch {b} conc {c} act {a}: {rec['throughput']['requests_per_s']:.0f} req/s, "
                            f"p50 {rec['latency']['p50_ms']:.2f} ms, p99 {rec['latency']['p99_ms']:.2f} ms"
                        )
    return records


def summarize_remote(records: list[dict[str, Any]]) -> str:
    if not records:
        return "no points"
    t = records[0]["config"]["target"]
    lines = [
        f"=== forgetrt bench --url {t['url']} ({t['protocol']}, model {t['model']}), "
        f"{t['client_processes']} client processes on {records[0]['env']['cpu_count']} CPUs ===",
        f"{'batch':>5} {'conc':>4} {'act':>3} {'path':>5} | {'min':>8} {'mean':>8} {'p50':>8} {'p90':>8} {'p95':>8} "
        f"{'p99':>8} {'max':>8} ms | {'img/s':>9} {'req/s':>9} | errors",
    ]
    for r in records:
        p, lat = r["point"], r["latency"]
        lines.append(
            f"{p['batch']:>5} {p['concurrency']:>4} {p['active_vectors']:>3} {p['path']:>5} | "
            + " ".join(
                f"{lat[k]:>8.3f}" for k in ("min_ms", "mean_ms", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms")
            )
            + f" ms | {r['throughput']['images_per_s']:>9.1f} {r['throughput']['requests_per_s']:>9.1f} | {r['errors']}"
        )
    return "\n".join(lines)
