"""forgetrt.runtime: contracts and serving. Importing it never imports torch or tensorrt.

Exports the Runtime (per-request forget-vector composition, dynamic batching, hot swap), the backend
registry, the IOSpec contract, the three artifacts it owns (the model folder, the vector bank and the
bundle, each with a typed manifest), and the error hierarchy.
"""

from .backends import BackendEntry, backend_names, create_backend, list_backends, register_backend
from .bank import VectorBank, VectorEntry, validate_vector_name
from .batcher import BatchingConfig, InferResult
from .bundle import Bundle, BundleManifest
from .compose import BankSnapshot, Composition
from .errors import (
    ArtifactError,
    BackendUnavailableError,
    CorruptArtifactError,
    DataError,
    DeadlineExceededError,
    EngineError,
    ForgetRTError,
    InvalidInputError,
    MismatchError,
    QueueFullError,
    RuntimeClosedError,
    UnknownNameError,
)
from .files import weights_fingerprint
from .iospec import IOSpec
from .model_folder import ModelManifest, read_model_manifest
from .runtime import Runtime, RuntimeConfig

__all__ = [
    "Runtime",
    "RuntimeConfig",
    "BatchingConfig",
    "InferResult",
    "BankSnapshot",
    "Composition",
    "IOSpec",
    "VectorBank",
    "VectorEntry",
    "Bundle",
    "BundleManifest",
    "ModelManifest",
    "read_model_manifest",
    "BackendEntry",
    "list_backends",
    "backend_names",
    "register_backend",
    "create_backend",
    "BackendUnavailableError",
    "validate_vector_name",
    "weights_fingerprint",
    "ForgetRTError",
    "InvalidInputError",
    "UnknownNameError",
    "ArtifactError",
    "CorruptArtifactError",
    "MismatchError",
    "DataError",
    "QueueFullError",
    "DeadlineExceededError",
    "RuntimeClosedError",
    "EngineError",
]
