"""forgetrt.runtime: contracts and serving. Importing it never imports torch or tensorrt.

Exports the Runtime (per-request forget-vector composition, dynamic batching, hot swap), the IOSpec
contract, the vector bank and bundle formats, and the error hierarchy.
"""

from .bank import VectorBank, validate_vector_name
from .batcher import InferResult
from .bundle import Bundle
from .compose import BankState
from .core import Runtime, RuntimeConfig
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

__all__ = [
    "Runtime",
    "RuntimeConfig",
    "InferResult",
    "BankState",
    "IOSpec",
    "VectorBank",
    "Bundle",
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
