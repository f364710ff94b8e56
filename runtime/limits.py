"""What one HTTP server accepts: body and header sizes, time limits, connections, requests in flight.

Kept apart from the server module so the command line can build its options from the fields without
importing the HTTP stack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import InvalidInputError

__all__ = ["ServerLimits"]


@dataclass(frozen=True)
class ServerLimits:
    """What one server accepts (defaults in parentheses are what ``forgetrt serve`` uses)."""

    max_body_bytes: int = field(
        default=64 << 20, metadata={"help": "Largest request body; larger is refused with 413 before it is read."}
    )
    max_header_bytes: int = field(default=64 << 10, metadata={"help": "Largest request line plus headers."})
    header_timeout_s: float = field(
        default=10.0, metadata={"help": "Seconds to send complete headers (from connecting or the last response)."}
    )
    body_timeout_s: float = field(default=30.0, metadata={"help": "Seconds to send the whole body (408 after)."})
    keep_alive_s: float = field(default=5.0, metadata={"help": "Seconds an idle keep-alive connection stays open."})
    max_connections: int = field(
        default=1000, metadata={"help": "Open connections; beyond, a new one gets 503 and is closed."}
    )
    max_inflight: int = field(
        default=256, metadata={"help": "Requests being read, parsed or computed; beyond, 429 before the body is read."}
    )
    max_json_depth: int = field(default=64, metadata={"help": "Deepest JSON nesting accepted in a request."})
    parse_workers: int = field(
        default=1,
        metadata={
            "help": "Processes that parse request JSON of 1 MiB or more and encode answers of 65,536 or more "
            "logits, so they do not hold other clients up (Python's JSON holds the GIL); 0 uses a thread."
        },
    )

    def __post_init__(self) -> None:
        for k in ("max_body_bytes", "max_header_bytes", "max_connections", "max_inflight", "max_json_depth"):
            if int(getattr(self, k)) < 1:
                raise InvalidInputError(f"{k} must be >= 1, got {getattr(self, k)}")
        if int(self.parse_workers) < 0:
            raise InvalidInputError(f"parse_workers must be >= 0, got {self.parse_workers}")
        for k in ("header_timeout_s", "body_timeout_s", "keep_alive_s"):
            v = float(getattr(self, k))
            if not (math.isfinite(v) and v > 0):
                raise InvalidInputError(f"{k} must be > 0 seconds, got {v}")
