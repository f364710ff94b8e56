"""forgetrt.runtime: contracts and serving. Importing it never imports torch or tensorrt.

Exports the IOSpec contract, the vector bank and the error hierarchy.
"""

from .bank import VectorBank, validate_vector_name
from .errors import (
    ArtifactError,
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
