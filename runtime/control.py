"""The server's control plane: who may change the served bank, from where, and the record of it.

Off by default: without a credential, every state-changing endpoint answers 403. With one (a bearer
token from a file or ``FORGETRT_ADMIN_TOKEN``, compared in constant time), a bank may be loaded only
from under ``bank_root`` (the path is resolved; anything that leaves the root, ``..`` or a symlink,
is refused with the same message as a missing bank, so errors do not reveal what exists outside it).
Every attempt is appended to ``state_dir/audit.jsonl`` (time, caller, bank, its tensors' sha256, the
version, the outcome) and the served bank is recorded in ``state_dir/state.json``; on start the server
restores it, and refuses to start if it cannot (the last bank state is always explicit).

Example::

    control = ControlPlane.from_files(token_file="admin.token", bank_root="banks", state_dir="state")
    app = create_app(runtime, "digits", control=control)
"""

from __future__ import annotations

import datetime as _dt
import hmac
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .bank import MANIFEST_FILE, VectorBank
from .errors import ArtifactError, ForgetRTError, InvalidInputError, UnknownNameError
from .files import atomic_write_json, read_json
from .runtime import Runtime

__all__ = ["ControlPlane", "TOKEN_ENV", "BankLoadRefused", "Unauthorized", "ControlDisabled", "RecordError"]

TOKEN_ENV = "FORGETRT_ADMIN_TOKEN"
MIN_TOKEN_LENGTH = 16
DISABLED_MESSAGE = "the control plane is disabled: start the server with an admin token to change banks"
UNAUTHORIZED_MESSAGE = "a valid 'Authorization: Bearer <token>' header is required"


class ControlDisabled(InvalidInputError):
    """The control plane is off (no credential configured): 403."""


class Unauthorized(InvalidInputError):
    """A missing or wrong credential: 401."""


class RecordError(ForgetRTError):
    """The audit log or state file could not be written: the change is not made (500, the server's fault)."""


class BankLoadRefused(UnknownNameError):
    """The bank is not a bank under the root (or does not exist): 404, one message for every reason."""


@dataclass(frozen=True)
class ControlPlane:
    token: str | None = None
    bank_root: Path | None = None
    state_dir: Path | None = None

    #: whether this plane keeps the audit log and state itself (a cluster replica's coordinator does instead)
    records_locally: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.token is None:
            return
        if len(self.token) < MIN_TOKEN_LENGTH:
            raise InvalidInputError(f"the admin token must be at least {MIN_TOKEN_LENGTH} characters")
        if self.bank_root is None or (self.records_locally and self.state_dir is None):
            raise InvalidInputError(
                "an admin token needs --bank-root (where banks may be loaded from) and --state-dir (audit log and "
                "the served bank's state, restored on restart)"
            )
        if not Path(self.bank_root).is_dir():
            raise ArtifactError(f"bank root {self.bank_root} is not a folder")
        object.__setattr__(self, "bank_root", Path(self.bank_root).resolve())
        if not self.records_locally:
            return
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        object.__setattr__(self, "_lock", threading.Lock())
        try:  # a change that cannot be recorded is not made: find out now, not at the first load
            self._check_writable()
        except OSError as e:
            raise ArtifactError(f"state dir {self.state_dir} cannot hold the audit log and state: {e}") from None

    @property
    def enabled(self) -> bool:
        return self.token is not None

    @classmethod
    def from_files(
        cls,
        *,
        token_file: str | os.PathLike | None = None,
        bank_root: str | os.PathLike | None = None,
        state_dir: str | os.PathLike | None = None,
        env: dict[str, str] | None = None,
    ) -> ControlPlane:
        """The token from ``token_file`` (first line) or, without one, the ``FORGETRT_ADMIN_TOKEN`` variable."""
        token = None
        if token_file is not None:
            p = Path(token_file)
            if not p.is_file():
                raise ArtifactError(f"admin token file not found: {p}")
            try:
                text = p.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as e:
                raise ArtifactError(f"cannot read the admin token file {p}: {type(e).__name__}") from None
            token = text.splitlines()[0].strip() if text else ""
        else:
            token = (env if env is not None else os.environ).get(TOKEN_ENV) or None
        return cls(
            token, None if bank_root is None else Path(bank_root), None if state_dir is None else Path(state_dir)
        )

    # ------------------------------------------------------------------ requests
    def authorize(self, authorization: str | None) -> None:
        """Raise ControlDisabled (no credential configured) or Unauthorized (missing or wrong bearer)."""
        if self.token is None:
            raise ControlDisabled(DISABLED_MESSAGE)
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise Unauthorized(UNAUTHORIZED_MESSAGE)

    def resolve_bank(self, raw: Any) -> Path:
        """A bank folder named relative to the root, resolved, inside it; else BankLoadRefused."""
        if not isinstance(raw, str) or not raw or "\x00" in raw:
            raise InvalidInputError("parameters.bank must be a bank folder name relative to the bank root")
        assert self.bank_root is not None
        refused = BankLoadRefused(f"bank {raw[:100]!r} not found under the bank root")
        # '..' is refused before anything is resolved: resolving it would test paths outside the root
        # (an existence oracle); a name is a plain relative path of folder names
        parts = raw.replace("\\", "/").split("/")
        if os.path.isabs(raw) or any(part in ("", ".", "..") for part in parts):
            raise refused
        try:
            raw.encode("utf-8")
            path = (self.bank_root / raw).resolve(strict=True)
        except (OSError, RuntimeError, ValueError):
            raise refused from None
        if not path.is_relative_to(self.bank_root) or not (path / MANIFEST_FILE).is_file():
            raise refused
        return path

    # ------------------------------------------------------------------ record
    def _check_writable(self) -> None:
        """Raise OSError unless the audit log can be appended to and the state file replaced."""
        assert self.state_dir is not None
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / "audit.jsonl", "a"):
            pass
        atomic_write_json(self.state_dir / ".state-probe.json", {})
        (self.state_dir / ".state-probe.json").unlink()
        if (self.state_dir / "state.json").exists() and not (self.state_dir / "state.json").is_file():
            raise IsADirectoryError(f"{self.state_dir / 'state.json'} is not a file")

    def _audit(self, entry: dict[str, Any]) -> None:
        assert self.state_dir is not None
        self.state_dir.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds"), **entry})
        with open(self.state_dir / "audit.jsonl", "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def load_bank(self, runtime: Runtime, raw: Any, caller: str) -> dict[str, Any]:
        """Resolve, load, install, audit and persist (blocking: call it off the event loop)."""
        with self._lock:  # type: ignore[attr-defined]
            record: dict[str, Any] = {"caller": caller, "action": "load", "bank": str(raw)}
            try:
                self._check_writable()
            except OSError as e:
                raise RecordError(f"the bank change cannot be recorded ({type(e).__name__}); nothing changed") from e
            try:
                path = self.resolve_bank(raw)
                rel = path.relative_to(self.bank_root).as_posix()  # type: ignore[arg-type]
                bank = VectorBank.load(path)  # verified against its manifest's tensors hash
                before = runtime.snapshot
                state = runtime.reload_bank(bank)
            except Exception as e:
                self._audit({**record, "outcome": "refused", "error": type(e).__name__})
                raise
            sha = bank.vectors_sha256
            record.update(bank=rel, vectors_sha256=sha, version=state.version, outcome="ok")
            try:
                self._audit(record)
                atomic_write_json(self.state_dir / "state.json", {"bank": rel, "vectors_sha256": sha})  # type: ignore[operator]
            except OSError as e:  # not recorded: not served either (a restart would silently undo it)
                runtime.revert_to(before, label=f"rollback: could not record loading {rel}")
                raise RecordError(
                    f"the bank change could not be recorded ({type(e).__name__}); rolled back to the previous bank"
                ) from e
            return {"version": state.version, "vectors": list(state.names), "bank": rel, "vectors_sha256": sha}

    def restore(self, runtime: Runtime) -> dict[str, Any] | None:
        """Serve the bank ``state.json`` names (its hash checked) before the first request; None when
        there is no recorded state. Anything else is an error: the server must not start on a guess."""
        if self.state_dir is None or not (self.state_dir / "state.json").is_file():
            return None
        state = read_json(self.state_dir / "state.json", "control-plane state")
        try:
            rel, sha = str(state["bank"]), str(state["vectors_sha256"])
        except (KeyError, TypeError) as e:
            raise ArtifactError(f"{self.state_dir / 'state.json'} is malformed: {e!r}") from e
        try:
            path = self.resolve_bank(rel)
        except BankLoadRefused as e:
            raise ArtifactError(
                f"the last served bank {rel!r} ({self.state_dir / 'state.json'}) is gone from the bank root: "
                "restore it, or remove the state file to start from the bundle's own bank"
            ) from e
        bank = VectorBank.load(path)
        if bank.vectors_sha256 != sha:
            raise ArtifactError(
                f"bank {rel!r} changed since it was served (sha256 differs from {self.state_dir / 'state.json'}): "
                "load it again through the control plane, or remove the state file"
            )
        runtime.reload_bank(bank)
        self._audit({"caller": "startup", "action": "restore", "bank": rel, "vectors_sha256": sha, "outcome": "ok"})
        return {"bank": rel, "vectors_sha256": sha}
