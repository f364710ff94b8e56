"""Signing bundles with OpenSSF ``model-signing`` (offline, an elliptic-curve key pair).

``sign_bundle`` writes ``bundle.sig`` into the bundle folder: a Sigstore bundle over a manifest of every
file's sha256 (the signature file itself excluded). ``verify_bundle`` checks it against a public key:
any file changed, added or removed, or a signature by another key, is refused. ``Bundle.load`` verifies
bound bundles itself (the manifest agrees with the graph); signing adds who produced them.

Needs the ``sign`` extra (``pip install 'forgetrt[sign]'``: model-signing and pyopenssl, which it imports
without declaring). Keys are standard PEM files, e.g.::

    openssl ecparam -name prime256v1 -genkey -noout -out signing.pem
    openssl ec -in signing.pem -pubout -out signing.pub
    forgetrt sign runs/bundle --key signing.pem
    forgetrt serve runs/bundle --verify-key signing.pub
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .bundle import SIGNATURE_FILE
from .errors import ArtifactError, BackendUnavailableError, CorruptArtifactError, InvalidInputError, MismatchError

__all__ = ["sign_bundle", "verify_bundle", "SIGNATURE_FILE"]


def _model_signing() -> Any:
    try:
        import model_signing
    except ImportError as e:
        raise BackendUnavailableError(
            "signing needs the 'sign' extra: pip install 'forgetrt[sign]' (model-signing and pyopenssl)"
        ) from e
    return model_signing


def _hashing(ms: Any) -> Any:
    return ms.hashing.Config().set_ignored_paths(paths=[SIGNATURE_FILE], ignore_git_paths=False)


def _key(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"{what} not found: {p}")
    return p


def sign_bundle(bundle: str | os.PathLike, private_key: str | os.PathLike, password: str | None = None) -> Path:
    """Sign every file of the bundle folder; returns the signature's path (``bundle.sig`` inside it)."""
    ms = _model_signing()
    folder = Path(bundle)
    if not folder.is_dir():
        raise ArtifactError(f"bundle folder not found: {folder}")
    key = _key(private_key, "private key")
    sig = folder / SIGNATURE_FILE
    try:
        ms.signing.Config().use_elliptic_key_signer(private_key=key, password=password).set_hashing_config(
            _hashing(ms)
        ).sign(folder, sig)
    except AttributeError as e:  # model-signing assumes an EC key (reads its curve)
        raise InvalidInputError(f"cannot sign with {key}: not an elliptic-curve private key ({e})") from e
    except (ValueError, TypeError, OSError) as e:
        raise CorruptArtifactError(f"cannot sign {folder} with {key}: {str(e).splitlines()[0][:300]}") from e
    return sig


def verify_bundle(bundle: str | os.PathLike, public_key: str | os.PathLike) -> None:
    """Refuse (:class:`MismatchError`) a bundle whose files differ from what the key signed."""
    ms = _model_signing()
    folder = Path(bundle)
    key = _key(public_key, "public key")
    sig = folder / SIGNATURE_FILE
    if not sig.is_file():
        raise MismatchError(f"bundle {folder} is not signed ({SIGNATURE_FILE} missing) but a verify key was given")
    try:
        ms.verifying.Config().use_elliptic_key_verifier(public_key=key).set_hashing_config(_hashing(ms)).verify(
            folder, sig
        )
    except Exception as e:  # noqa: BLE001 - model-signing raises ValueError, JSONDecodeError, ... on any mismatch
        raise MismatchError(f"bundle {folder} fails its signature check: {str(e).splitlines()[0][:300]}") from e
