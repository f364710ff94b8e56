"""forgetrt.runtime: contracts and serving. Importing it never imports torch or tensorrt.

Exports the IOSpec contract, the vector bank and the error hierarchy.
"""

from .bank import VectorBank, validate_vector_name
from .bundle import Bundle
from .errors import (
    ArtifactError,
    BackendUnavailableError,
    CorruptArtifactError,
    DataError,
    ForgetRTError,
    InvalidInputError,
    MismatchError,
    UnknownNameError,
)
from .files import weights_fingerprint
from .iospec import IOSpec

__all__ = [
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
]
