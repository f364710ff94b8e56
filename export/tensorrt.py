"""TensorRT engine building and running, written against the TensorRT 10 Python API.

``tensorrt`` is imported lazily, inside these functions, so nothing else in ForgetRT needs it.
TensorRT only installs from NVIDIA's index; on machines without it every entry point raises
:class:`BackendUnavailableError`, and its tests (marker ``trt``) skip. This module has **not** been
run against a real TensorRT yet: it follows the documented API (Builder / OnnxParser /
IBuilderConfig with one optimization profile, a workspace limit and a timing cache; Runtime /
ICudaEngine / IExecutionContext with named tensors, ``set_input_shape`` and ``execute_async_v3``;
Refitter for swapping the ``forget_bank`` initializer of a refittable engine). The runner lives in
:mod:`forgetrt.runtime.backends.tensorrt_backend`.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from forgetrt.runtime.backends.tensorrt_backend import TensorRTRunner, import_tensorrt
from forgetrt.runtime.bundle import MODEL_PLAN, Bundle, TensorRTBuild, add_bundle_file
from forgetrt.runtime.errors import CorruptArtifactError, InvalidInputError

__all__ = ["TrtBuildConfig", "build_engine", "TensorRTRunner", "import_tensorrt"]


@dataclass(frozen=True)
class TrtBuildConfig:
    """The engine's optimization profile (batch sizes) and build flags."""

    fp16: bool = False
    min_batch_size: int = 1
    opt_batch_size: int = 32
    max_batch_size: int = 256
    refittable: bool = False
    workspace_mib: int = 1024
    timing_cache: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch_size <= self.opt_batch_size <= self.max_batch_size:
            raise InvalidInputError(
                f"batch sizes must satisfy 1 <= min <= opt <= max, got {self.min_batch_size}, {self.opt_batch_size}, "
                f"{self.max_batch_size}"
            )
        if self.workspace_mib < 16:
            raise InvalidInputError(f"workspace must be at least 16 MiB, got {self.workspace_mib}")


def build_engine(bundle_path: str | os.PathLike, cfg: TrtBuildConfig = TrtBuildConfig()) -> dict[str, Any]:
    """Parse the bundle's ONNX graph, build a serialized engine, and add it to the bundle as model.plan."""
    bundle = Bundle.load(bundle_path)
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    import onnx

    from .onnx_graph import freeze_bank

    # the bundle's graph declares forget_bank as an overridable input; TensorRT gets it as a constant
    # (hot swap on TensorRT is a refit of a --refittable engine, K fixed)
    if not parser.parse(freeze_bank(onnx.load(str(bundle.onnx_path))).SerializeToString()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CorruptArtifactError(f"TensorRT could not parse {bundle.onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_mib << 20)
    if cfg.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if cfg.refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    cache_bytes = Path(cfg.timing_cache).read_bytes() if cfg.timing_cache and Path(cfg.timing_cache).is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    spec = bundle.iospec
    k = len(bundle.vectors)
    profile = builder.create_optimization_profile()
    lo, opt, hi = cfg.min_batch_size, cfg.opt_batch_size, cfg.max_batch_size
    profile.set_shape(spec.image_name, (lo, *spec.shape), (opt, *spec.shape), (hi, *spec.shape))
    profile.set_shape(spec.coeffs_name, (lo, k), (opt, k), (hi, k))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise CorruptArtifactError(f"TensorRT failed to build an engine for {bundle.onnx_path} (see the log above)")
    if cfg.timing_cache:
        Path(cfg.timing_cache).write_bytes(bytes(config.get_timing_cache().serialize()))
    build = TensorRTBuild(cfg.fp16, lo, opt, hi, cfg.refittable, str(trt.__version__))
    add_bundle_file(bundle, MODEL_PLAN, bytes(plan), tensorrt=build)
    return {"plan": str(bundle.path / MODEL_PLAN), **asdict(build)}
