"""The KServe v2 gRPC front end (``inference.GRPCInferenceService``): the same model service as the REST
server, on its own port, in the same event loop (``forgetrt serve --grpc-port 8001``).

The service definition is Triton's superset of KServe's ``grpc_predict_v2.proto`` (model configuration,
statistics, repository calls), compiled by the Triton client package (``tritonclient[grpc]``, the
``grpc`` extra): reusing its generated code keeps the wire format exactly the one ``tritonclient.grpc``
and KServe's gRPC client speak. Requests and answers use raw tensor contents (``raw_input_contents``,
``raw_output_contents``), or the typed ``contents`` fields for inputs. Composition and everything else
follow the REST server: request parameters ``forget`` (``"forget-3=1,forget-7=0.5"``), ``policy``,
``timeout`` (µs); errors are gRPC status codes (INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED,
DEADLINE_EXCEEDED, UNAVAILABLE, UNAUTHENTICATED, PERMISSION_DENIED, INTERNAL) with the same messages.
Shared-memory and CUDA shared-memory calls, streaming and tracing answer UNIMPLEMENTED.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from .errors import ForgetRTError, InvalidInputError
from .limits import ServerLimits
from .service import (
    EXTENSIONS,
    InferCall,
    ModelService,
    TooLarge,
    parse_output_parameters,
    parse_request_parameters,
    status_for,
)

__all__ = ["start_grpc_server"]

log = logging.getLogger("forgetrt.grpc")

_DTYPES = {
    "FP32": (np.float32, "fp32_contents"),
    "FP64": (np.float64, "fp64_contents"),
    "FP16": (np.float16, None),
    "INT64": (np.int64, "int64_contents"),
    "INT32": (np.int32, "int_contents"),
    "UINT8": (np.uint8, "uint_contents"),
}


def _codes() -> dict[int, Any]:
    import grpc

    c = grpc.StatusCode
    return {
        400: c.INVALID_ARGUMENT,
        401: c.UNAUTHENTICATED,
        403: c.PERMISSION_DENIED,
        404: c.NOT_FOUND,
        408: c.DEADLINE_EXCEEDED,
        413: c.RESOURCE_EXHAUSTED,
        429: c.RESOURCE_EXHAUSTED,
        500: c.INTERNAL,
        503: c.UNAVAILABLE,
    }


def _param(p: Any) -> Any:
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


def _tensor(t: Any, raw: bytes | None, max_elements: int) -> np.ndarray:
    name = t.name
    if t.datatype not in _DTYPES:
        raise InvalidInputError(
            f"input {name!r}: unsupported datatype {t.datatype[:40]!r}; valid: {', '.join(_DTYPES)}"
        )
    dtype, field = _DTYPES[t.datatype]
    shape = list(t.shape)
    if len(shape) > 8 or any(d < 0 or d >= 2**31 for d in shape):
        raise InvalidInputError(f"input {name!r}: shape must have at most 8 dimensions in [0, 2^31), got {shape[:9]}")
    count = math.prod(shape)
    if count > max_elements or math.prod(d for d in shape if d) > max_elements:  # an empty [0, 2^31, 2^31] too
        raise TooLarge(f"input {name!r} has shape {shape}, more than a request can hold here")
    if raw is not None and len(t.contents.ListFields()):
        raise InvalidInputError(f"input {name!r}: give raw_input_contents or typed contents, not both")
    if raw is not None:
        if len(raw) != count * np.dtype(dtype).itemsize:
            raise InvalidInputError(f"input {name!r}: {len(raw)} bytes do not hold {shape} {t.datatype}")
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    if field is None:
        raise InvalidInputError(f"input {name!r}: {t.datatype} data must come as raw_input_contents")
    values = getattr(t.contents, field)
    if len(values) != count:
        raise InvalidInputError(f"input {name!r}: {len(values)} values for shape {shape}")
    arr = np.asarray(values)
    if np.dtype(dtype).kind in "iu" and arr.size:
        info = np.iinfo(dtype)
        if arr.min() < info.min or arr.max() > info.max:
            raise InvalidInputError(f"input {name!r}: values outside {t.datatype}")
    return arr.astype(dtype).reshape(shape)


def _call(request: Any, svc: ModelService, limits: ServerLimits) -> InferCall:
    spec = svc.spec
    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        raise InvalidInputError(
            f"{len(request.raw_input_contents)} raw_input_contents for {len(request.inputs)} inputs: give one per input"
        )
    tensors: dict[str, np.ndarray] = {}
    for i, t in enumerate(request.inputs):
        if t.name in tensors:
            raise InvalidInputError(f"input {t.name!r} given twice")
        if t.name not in (spec.image_name, spec.coeffs_name):
            raise InvalidInputError(f"unknown input {t.name[:60]!r}; valid: {spec.image_name}, {spec.coeffs_name}")
        raw = request.raw_input_contents[i] if request.raw_input_contents else None
        tensors[t.name] = _tensor(t, raw, limits.max_body_bytes)
    if spec.image_name not in tensors:
        raise InvalidInputError(f"input {spec.image_name!r} is required")
    params = {k: _param(v) for k, v in request.parameters.items()}
    # binary flags are checked there and moot here: gRPC answers are always raw bytes
    outputs = [
        parse_output_parameters(o.name, {k: _param(v) for k, v in o.parameters.items()}) for o in request.outputs
    ] or None
    rid = request.id or None
    if rid is not None and len(rid) > 1024:
        raise InvalidInputError("'id' must be at most 1024 characters")
    return InferCall(
        tensors[spec.image_name], tensors.get(spec.coeffs_name), parse_request_parameters(params), outputs, rid
    )


def _servicer(svc: ModelService, limits: ServerLimits, version: str) -> Any:
    import grpc
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2 as mc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pbg

    codes = _codes()

    async def _abort(context: Any, e: ForgetRTError, inference: bool = False) -> None:
        status = status_for(e)
        svc.count_failure(e, status, inference=inference)
        # gRPC carries the message in a header (8 KiB soft limit): never echo a long client string whole
        await context.abort(codes.get(status, grpc.StatusCode.INTERNAL), str(e)[:2000])

    class Servicer(pbg.GRPCInferenceServiceServicer):
        async def ServerLive(self, request, context):  # noqa: N802 - the generated service's names
            return pb.ServerLiveResponse(live=True)

        async def ServerReady(self, request, context):  # noqa: N802
            return pb.ServerReadyResponse(ready=(await svc.readiness()) is None)

        async def ModelReady(self, request, context):  # noqa: N802
            try:
                svc.check_model(request.name, request.version)
            except ForgetRTError as e:
                await _abort(context, e)
            return pb.ModelReadyResponse(ready=(await svc.readiness()) is None)

        async def ServerMetadata(self, request, context):  # noqa: N802
            return pb.ServerMetadataResponse(name="forgetrt", version=version, extensions=list(EXTENSIONS))

        async def ModelMetadata(self, request, context):  # noqa: N802
            try:
                svc.check_model(request.name, request.version)
            except ForgetRTError as e:
                await _abort(context, e)
            md = await svc.metadata()
            tm = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=md["name"],
                versions=md["versions"],
                platform=md["platform"],
                inputs=[tm(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in md["inputs"]],
                outputs=[tm(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in md["outputs"]],
            )

        async def ModelConfig(self, request, context):  # noqa: N802
            try:
                svc.check_model(request.name, request.version)
            except ForgetRTError as e:
                await _abort(context, e)
            return pb.ModelConfigResponse(config=json_format.ParseDict(await svc.config(), mc.ModelConfig()))

        async def ModelStatistics(self, request, context):  # noqa: N802
            try:
                if request.name or request.version:
                    svc.check_model(request.name or svc.model_name, request.version)
            except ForgetRTError as e:
                await _abort(context, e)
            return json_format.ParseDict(await svc.statistics(), pb.ModelStatisticsResponse())

        async def RepositoryIndex(self, request, context):  # noqa: N802
            idx = pb.RepositoryIndexResponse.ModelIndex(name=svc.model_name, version="1", state="READY")
            return pb.RepositoryIndexResponse(models=[idx])

        async def RepositoryModelLoad(self, request, context):  # noqa: N802
            """Load a bank (``parameters["bank"]``, a string) with ``authorization: Bearer TOKEN`` metadata."""
            try:
                svc.check_model(request.model_name)
                auth = dict(context.invocation_metadata() or ()).get("authorization")
                bank = request.parameters["bank"].string_param if "bank" in request.parameters else None
                await svc.load_bank(auth, bank, context.peer() or "grpc")
            except ForgetRTError as e:
                await _abort(context, e)
            return pb.RepositoryModelLoadResponse()

        async def ModelInfer(self, request, context):  # noqa: N802
            try:
                svc.check_model(request.model_name, request.model_version)
                svc.admit()
                call = _call(request, svc, limits)
                outcome = await svc.infer(call)
            except ForgetRTError as e:
                await _abort(context, e, inference=True)
            data = outcome.classes if outcome.classes is not None else outcome.logits
            if data.dtype == object:
                raw = b"".join(len(v).to_bytes(4, "little") + v for v in data.reshape(-1))
                datatype = "BYTES"
            else:
                raw, datatype = data.tobytes(), "FP32"
            out = pb.ModelInferResponse.InferOutputTensor(name=outcome.output_name, datatype=datatype, shape=data.shape)
            resp = pb.ModelInferResponse(
                model_name=svc.model_name, model_version="1", id=request.id, outputs=[out], raw_output_contents=[raw]
            )
            resp.parameters["bank_version"].int64_param = outcome.bank_version
            # whole µs as int64: KServe's InferParameter has no double (Triton's does; both read int64)
            resp.parameters["queue_us"].int64_param = int(round(outcome.queue_us))
            resp.parameters["compute_us"].int64_param = int(round(outcome.compute_us))
            return resp

    return Servicer(), pbg


SERVICE = "inference.GRPCInferenceService"


def _handlers(servicer: Any, pbg: Any) -> Any:
    """The service's unary calls this server implements, each parsing its own request: bytes that are not a
    valid message get INVALID_ARGUMENT (grpcio's own deserialization would answer UNKNOWN). Calls the servicer
    does not implement (shared memory, streaming, tracing, logging) are not registered: UNIMPLEMENTED."""
    import grpc
    from google.protobuf import message_factory
    from google.protobuf.message import DecodeError
    from tritonclient.grpc import service_pb2 as pb

    base = pbg.GRPCInferenceServiceServicer
    handlers = {}
    for m in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
        impl = getattr(type(servicer), m.name, None)
        if m.client_streaming or m.server_streaming or impl is None or impl is getattr(base, m.name, None):
            continue
        request_cls = message_factory.GetMessageClass(m.input_type)
        method = getattr(servicer, m.name)

        def make(method: Any = method, request_cls: Any = request_cls, name: str = m.name) -> Any:
            async def handle(raw: bytes, context: Any) -> Any:
                try:
                    request = request_cls.FromString(raw)
                except (DecodeError, ValueError) as e:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed {name} request: {str(e)[:200]}")
                return await method(request, context)

            return handle

        handlers[m.name] = grpc.unary_unary_rpc_method_handler(
            make(), request_deserializer=None, response_serializer=lambda r: r.SerializeToString()
        )
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


async def start_grpc_server(
    svc: ModelService,
    *,
    host: str = "127.0.0.1",
    port: int = 8001,
    limits: ServerLimits = ServerLimits(),
    reuse_port: bool = False,
) -> tuple[Any, int]:
    """Start the gRPC server on the running event loop; returns (server, bound port). Stop it with
    ``await server.stop(grace)``. ``reuse_port``: bind with SO_REUSEPORT, so that several front-end
    processes share the port (off by default: a second server on a taken port is an error)."""
    import grpc

    from .server import _version

    servicer, pbg = _servicer(svc, limits, _version())
    size = int(min(limits.max_body_bytes, 2**31 - 1))
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size),
            ("grpc.max_concurrent_streams", max(1, limits.max_inflight)),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ]
    )
    server.add_generic_rpc_handlers((_handlers(servicer, pbg),))
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise InvalidInputError(f"cannot listen for gRPC on {host}:{port}")
    await server.start()
    log.info("gRPC (KServe v2) on %s:%d", host, bound)
    return server, bound
