"""Data sets and forget specifications.

Data specs (the CLI's ``--data``):

- ``digits``: scikit-learn's bundled 8×8 digits (1,797 images, no download), split 75/25 stratified.
- ``cifar10:PATH``: CIFAR-10 from the standard ``cifar-10-batches-py`` folder, an ImageFolder tree
  (``split/class/*.jpg|png`` with splits ``train`` and ``test``), or a ``.tar``/``.tar.gz`` of such a tree.
- ``imagefolder:PATH``: any ImageFolder set (any classes and image sizes), resized and center-cropped
  to the model's input size (see :mod:`forgetrt.train.imagefolder`); large sets are memory-mapped.

Images are decoded once into uint8 arrays [N, C, H, W] and cached as ``.npz`` (no pickle) under
``$FORGETRT_CACHE_DIR`` (default ``~/.cache/forgetrt``), keyed by the source's hash, so a second
run starts in a fraction of a second.

Forget specs select the training samples to unlearn: whole classes, a seeded random fraction, or an
index file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import tarfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from forgetrt.runtime.errors import DataError, InvalidInputError, unknown
from forgetrt.runtime.files import atomic_write, sha256_file

__all__ = [
    "Dataset",
    "ForgetSpec",
    "ForgetSplit",
    "ValidationSplit",
    "load_data",
    "parse_data_spec",
    "parse_subset",
    "cache_dir",
    "DATA_KINDS",
]

DATA_KINDS = ("digits", "cifar10", "imagefolder")
_IMG_EXT = (".jpg", ".jpeg", ".png")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test split as uint8 images [N, C, H, W]; ``x / scale`` gives [0, 1] pixels."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]
    scale: float
    source: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.x_train.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def channel_stats(self, idx: np.ndarray | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std of the training images (those at ``idx``, if given) in [0, 1] space."""
        rows = np.arange(len(self.x_train)) if idx is None else np.asarray(idx)
        c = self.x_train.shape[1]
        s1, s2, n = np.zeros(c), np.zeros(c), 0
        for i in range(0, len(rows), 1024):  # in chunks: a memory-mapped set is never read whole
            x = self.x_train[np.sort(rows[i : i + 1024])].astype(np.float64) / self.scale
            s1 += x.sum(axis=(0, 2, 3))
            s2 += np.square(x).sum(axis=(0, 2, 3))
            n += x.shape[0] * x.shape[2] * x.shape[3]
        mean = s1 / max(n, 1)
        std = np.sqrt(np.maximum(s2 / max(n, 1) - mean**2, 0.0))
        return tuple(float(m) for m in mean), tuple(float(max(s, 1e-3)) for s in std)

    def class_index(self, c: int | str) -> int:
        """A class given as index or label, checked against this data set."""
        if isinstance(c, str) and not c.strip().lstrip("-").isdigit():
            if c not in self.classes:
                raise unknown("class", c, self.classes)
            return self.classes.index(c)
        i = int(c)
        if not 0 <= i < self.num_classes:
            raise unknown("class", i, [f"{k} ({n})" for k, n in enumerate(self.classes)])
        return i

    def test_images(self, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The first ``limit`` test images as float32 [0, 1] pixels (the model's input space) and their labels."""
        x, y = self.x_test[:limit], self.y_test[:limit]
        return (x.astype(np.float32) / np.float32(self.scale)).astype(np.float32), y

    def subset(self, n_train: int | None = None, n_test: int | None = None, seed: int = 0) -> Dataset:
        """A stratified-by-chance random subset (for quick experiments); same classes and scale."""
        rng = np.random.default_rng(seed)

        def pick(x: np.ndarray, y: np.ndarray, n: int | None) -> tuple[np.ndarray, np.ndarray]:
            if n is None or n >= len(y):
                return x, y
            idx = np.sort(rng.choice(len(y), n, replace=False))
            return x[idx], y[idx]

        xtr, ytr = pick(self.x_train, self.y_train, n_train)
        xte, yte = pick(self.x_test, self.y_test, n_test)
        return Dataset(self.name, xtr, ytr, xte, yte, self.classes, self.scale, f"{self.source} (subset)")


# --------------------------------------------------------------------------- spec parsing


def parse_subset(text: str) -> tuple[int, int]:
    """``N_TRAIN,N_TEST`` (two positive whole numbers): the sizes :meth:`Dataset.subset` draws."""
    parts = text.split(",") if isinstance(text, str) else []
    try:
        n_train, n_test = (int(x) for x in parts)
    except ValueError:
        raise InvalidInputError(f"bad subset {text!r}: want N_TRAIN,N_TEST, two whole numbers") from None
    if n_train < 1 or n_test < 1:
        raise InvalidInputError(f"bad subset {text!r}: both sizes must be >= 1")
    return n_train, n_test


def parse_data_spec(spec: str) -> tuple[str, str | None]:
    """Split ``kind[:path]`` and check the kind; returns (kind, path or None)."""
    if not isinstance(spec, str) or not spec.strip():
        raise InvalidInputError("empty data spec; expected 'digits' or 'cifar10:PATH'")
    kind, sep, path = spec.strip().partition(":")
    kind = kind.lower()
    if kind not in DATA_KINDS:
        raise unknown("data spec kind", kind, ["digits", "cifar10:PATH", "imagefolder:PATH"])
    if kind == "digits":
        if path:
            raise InvalidInputError(f"data spec 'digits' takes no path, got {spec!r}")
        return kind, None
    if not path:
        raise InvalidInputError(f"data spec {spec!r} needs a path: '{kind}:PATH'")
    return kind, path


def load_data(spec: str, *, cache: bool = True, image_size: int | tuple[int, int] | None = None) -> Dataset:
    """Load a data set from a spec string (see module docstring). ``image_size`` (H×W, or one int for a
    square) resizes an ``imagefolder`` set; the fixed-size sets must already have it."""
    kind, path = parse_data_spec(spec)
    if kind == "digits":
        ds = _load_digits()
    elif kind == "cifar10":
        assert path is not None
        ds = _load_cifar10(Path(path).expanduser(), cache=cache)
    else:
        from .imagefolder import load_imagefolder

        assert path is not None
        a = load_imagefolder(path, image_size=image_size, cache=cache)
        classes = tuple(str(c) for c in a["classes"])
        return Dataset("imagefolder", a["x_train"], a["y_train"], a["x_test"], a["y_test"], classes, 255.0, path)
    if image_size is not None:
        hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if tuple(ds.shape[1:]) != tuple(hw):
            raise InvalidInputError(
                f"data {kind} has {ds.shape[1]}x{ds.shape[2]} images; only imagefolder data are resized (wanted "
                f"{hw[0]}x{hw[1]})"
            )
    return ds


def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = d.images.astype(np.uint8)[:, None, :, :]  # values 0..16
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    return Dataset("digits", xtr, ytr, xte, yte, tuple(str(i) for i in range(10)), 16.0, "sklearn.datasets.load_digits")


# --------------------------------------------------------------------------- CIFAR-10


def cache_dir() -> Path:
    return Path(os.environ.get("FORGETRT_CACHE_DIR") or Path.home() / ".cache" / "forgetrt")


def _source_hash(path: Path) -> str:
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        st = p.stat()
        h.update(f"{p.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _load_cifar10(path: Path, *, cache: bool) -> Dataset:
    if not path.exists():
        raise DataError(f"CIFAR-10 source not found: {path}")
    cached = None
    if cache:
        key = _source_hash(path)
        cached = cache_dir() / "datasets" / f"cifar10-{key[:24]}.npz"
        if cached.is_file():
            try:
                with np.load(cached, allow_pickle=False) as z:
                    arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test", "classes")}
                return _make_cifar(arrays, str(path))
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, DataError):
                cached.unlink(missing_ok=True)  # a broken cache entry is rebuilt, never trusted
    if path.is_file():
        arrays = _read_tar(path)
    elif _find_batches_dir(path) is not None:
        arrays = _read_batches(_find_batches_dir(path))  # type: ignore[arg-type]
    else:
        arrays = _read_image_folder(path)
    ds = _make_cifar(arrays, str(path))
    if cached is not None:
        atomic_write(cached, lambda p: _save_npz(p, arrays))
    return ds


def _save_npz(p: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(p, "wb") as f:
        np.savez(f, **arrays)


def _make_cifar(a: dict[str, Any], source: str) -> Dataset:
    classes = tuple(str(c) for c in a["classes"])
    for split in ("train", "test"):
        x = a[f"x_{split}"]
        if x.ndim != 4 or x.shape[1:] != (3, 32, 32) or x.dtype != np.uint8:
            raise DataError(f"CIFAR-10 {split} images must be uint8 3×32×32, got {x.dtype} {x.shape[1:]} from {source}")
        if len(x) == 0:
            raise DataError(f"CIFAR-10 source {source} has no {split} images")
    if len(classes) != 10:
        raise DataError(f"CIFAR-10 needs 10 classes, {source} has {len(classes)}: {classes}")
    return Dataset(
        "cifar10",
        a["x_train"],
        a["y_train"].astype(np.int64),
        a["x_test"],
        a["y_test"].astype(np.int64),
        classes,
        255.0,
        source,
    )


# -- the standard python batches (a pickle format: read with an allow-list unpickler)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batch dicts and nothing else: only numpy's array rebuilders are allowed."""

    # numpy's own rebuild functions, looked up from live objects so the numpy 1/2 module rename
    # (numpy.core -> numpy._core) does not matter
    _REBUILDERS = {"_reconstruct": np.zeros(0).__reduce__()[0], "scalar": np.int64(0).__reduce__()[0]}
    _MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")

    def find_class(self, module: str, name: str) -> Any:
        if module in self._MODULES and name in self._REBUILDERS:
            return self._REBUILDERS[name]
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a CIFAR batch file")


def _find_batches_dir(path: Path) -> Path | None:
    for cand in (path, path / "cifar-10-batches-py"):
        if (cand / "data_batch_1").is_file() and (cand / "test_batch").is_file():
            return cand
    return None


def _unpickle_batch(p: Path) -> dict:
    try:
        with open(p, "rb") as f:
            d = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise DataError(f"cannot read CIFAR batch {p}: {e}") from e
    if not isinstance(d, dict):
        raise DataError(f"CIFAR batch {p} does not hold a dict")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def _read_batches(root: Path) -> dict[str, np.ndarray]:
    def read(files: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for p in files:
            if not p.is_file():
                raise DataError(f"CIFAR-10 batch missing: {p}")
            d = _unpickle_batch(p)
            try:
                xs.append(np.asarray(d["data"], np.uint8).reshape(-1, 3, 32, 32))
                ys.append(np.asarray(d["labels"], np.int64))
            except (KeyError, ValueError) as e:
                raise DataError(f"CIFAR batch {p} lacks data/labels: {e}") from e
        return np.concatenate(xs), np.concatenate(ys)

    xtr, ytr = read([root / f"data_batch_{i}" for i in range(1, 6)])
    xte, yte = read([root / "test_batch"])
    classes: Sequence[str] = CIFAR10_CLASSES
    meta = root / "batches.meta"
    if meta.is_file():
        names = _unpickle_batch(meta).get("label_names")
        if names:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte, "classes": np.array(classes)}


# -- ImageFolder trees, on disk or in a tar archive

_MEMBER_RE = re.compile(r"(?:^|/)(train|test)/([^/]+)/[^/]+$")


def _decode_many(blobs: list[bytes]) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    out = np.empty((len(blobs), 3, 32, 32), np.uint8)
    for i, b in enumerate(blobs):
        try:
            with Image.open(io.BytesIO(b)) as im:
                arr = np.asarray(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"cannot decode image #{i} of a chunk: {e}") from e
        if arr.shape != (32, 32, 3):
            raise DataError(f"CIFAR-10 images must be 32×32, found one of {arr.shape[1]}×{arr.shape[0]}")
        out[i] = arr.transpose(2, 0, 1)
    return out


def _assemble(items: list[tuple[str, str, str, bytes]], source: Path) -> dict[str, np.ndarray]:
    """items: (split, class, member name, encoded bytes) -> arrays, decoding in parallel."""
    from forgetrt.runtime.logs import progress

    if not items:
        raise DataError(f"no images under train/<class>/ or test/<class>/ in {source}")
    items.sort(key=lambda t: (t[0], t[1], t[2]))
    splits = {s: sorted({c for sp, c, _, _ in items if sp == s}) for s in ("train", "test")}
    if not splits["train"] or not splits["test"]:
        raise DataError(f"{source} needs both train/ and test/ splits, found classes {splits}")
    if splits["train"] != splits["test"]:
        raise DataError(f"{source}: train classes {splits['train']} differ from test classes {splits['test']}")
    classes = splits["train"]
    blobs = [b for *_, b in items]
    chunk = 2000
    chunks = [blobs[i : i + chunk] for i in range(0, len(blobs), chunk)]
    workers = max(1, min(len(chunks), os.cpu_count() or 1))
    decoded: list[np.ndarray] = []
    with progress(total=len(blobs), desc="decode images", unit="img", leave=False) as bar:
        if workers == 1:
            for c in chunks:
                decoded.append(_decode_many(c))
                bar.update(len(c))
        else:
            from .imagefolder import decode_pool

            with decode_pool(workers) as pool:
                for arr in pool.map(_decode_many, chunks):
                    decoded.append(arr)
                    bar.update(len(arr))
    x = np.concatenate(decoded)
    split_arr = np.array([sp for sp, *_ in items])
    y = np.array([classes.index(c) for _, c, _, _ in items], np.int64)
    tr, te = split_arr == "train", split_arr == "test"
    return {"x_train": x[tr], "y_train": y[tr], "x_test": x[te], "y_test": y[te], "classes": np.array(classes)}


def _read_tar(path: Path) -> dict[str, np.ndarray]:
    items: list[tuple[str, str, str, bytes]] = []
    try:
        with tarfile.open(path, "r:*") as tf:
            for m in tf:
                if not m.isfile() or not m.name.lower().endswith(_IMG_EXT):
                    continue
                match = _MEMBER_RE.search(m.name)
                if not match:
                    continue
                f = tf.extractfile(m)
                if f is None:
                    continue
                items.append((match.group(1), match.group(2), m.name, f.read()))
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise DataError(f"cannot read archive {path}: {e}") from e
    return _assemble(items, path)


def _read_image_folder(path: Path) -> dict[str, np.ndarray]:
    items: list[tuple[str, str, str, bytes]] = []
    for p in sorted(path.rglob("*")):
        if p.is_file() and p.suffix.lower() in _IMG_EXT:
            rel = p.relative_to(path).as_posix()
            match = _MEMBER_RE.search(rel)
            if match:
                items.append((match.group(1), match.group(2), rel, p.read_bytes()))
    return _assemble(items, path)


# --------------------------------------------------------------------------- forget specs


@dataclass(frozen=True)
class ValidationSplit:
    """A seeded, class-stratified share of the training set set aside for validation.

    Held out when the classifier is trained (``train-model --val-fraction``, recorded in the model
    manifest), its images are data the model never saw: the honest stand-in for test data when
    vectors are tuned (their accuracy is held-out accuracy). Carved from a model that held nothing
    out, they are data it saw (members): good for checking a vector's collateral damage, not for
    estimating held-out accuracy. Test data are never used for either.
    """

    fraction: float
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < float(self.fraction) < 1.0:
            raise InvalidInputError(f"validation fraction must be in (0, 1), got {self.fraction}")

    def indices(self, ds: Dataset) -> np.ndarray:
        """Sorted training indices: ``round(fraction * n_c)`` of every class c, at least one each."""
        rng = np.random.default_rng(self.seed)
        picked = []
        for c in range(ds.num_classes):
            idx = np.flatnonzero(ds.y_train == c)
            if len(idx) < 2:
                continue
            k = min(len(idx) - 1, max(1, int(round(float(self.fraction) * len(idx)))))
            picked.append(rng.choice(idx, k, replace=False))
        return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)

    def describe(self, ds: Dataset) -> dict[str, Any]:
        idx = self.indices(ds)
        return {
            "fraction": float(self.fraction),
            "seed": int(self.seed),
            "count": int(len(idx)),
            "indices_sha256": _index_hash(idx),
        }

    @classmethod
    def from_description(cls, d: dict[str, Any], ds: Dataset | None = None) -> ValidationSplit:
        """Rebuild a recorded split; with ``ds``, check it selects the same images as when it was recorded."""
        try:
            split = cls(float(d["fraction"]), int(d.get("seed", 0)))
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"malformed validation split record {d!r}: {e}") from e
        if ds is not None and d.get("indices_sha256") and split.describe(ds)["indices_sha256"] != d["indices_sha256"]:
            raise DataError(
                f"data set {ds.name} ({ds.source}) is not the one this validation split was drawn from "
                f"({d.get('count')} images, fraction {split.fraction}, seed {split.seed}): "
                "pass the data the model was trained on"
            )
        return split


def _index_hash(idx: np.ndarray) -> str:
    return hashlib.sha256(",".join(str(int(i)) for i in sorted(set(idx.tolist()))).encode()).hexdigest()


@dataclass(frozen=True)
class ForgetSplit:
    """Index sets a forget spec induces on a data set."""

    forget: np.ndarray  # training indices to unlearn
    retain: np.ndarray  # the other training indices
    test: np.ndarray  # test indices TA is measured on (remaining classes for class-wise)
    test_forgotten: np.ndarray  # class-wise: test indices of the forgotten classes (else empty)
    classes: tuple[int, ...] | None  # class-wise: the forgotten classes
    #: training indices outside both sets: the classifier's held-out validation split
    held_out: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


@dataclass(frozen=True)
class ForgetSpec:
    """What to unlearn: exactly one of whole ``classes``, a random ``fraction`` (with ``seed``), or ``indices``.

    Example::

        ForgetSpec(classes=(0, 3)).resolve(ds).forget      # every training index of classes 0 and 3
        ForgetSpec(fraction=0.1, seed=1).resolve(ds)       # a seeded 10% of the training set
    """

    classes: tuple[int | str, ...] | None = None
    fraction: float | None = None
    seed: int = 0
    indices: tuple[int, ...] | None = None
    indices_source: str | None = None  # file the indices came from, for the manifest

    def __post_init__(self) -> None:
        given = [k for k in ("classes", "fraction", "indices") if getattr(self, k) is not None]
        if len(given) != 1:
            raise InvalidInputError(
                f"a forget spec needs exactly one of classes, fraction or indices; got {given or 'none'}"
            )
        if self.fraction is not None and not (0.0 < float(self.fraction) < 1.0):
            raise InvalidInputError(f"forget fraction must be in (0, 1), got {self.fraction}")
        if self.classes is not None and len(self.classes) == 0:
            raise InvalidInputError("forget classes: the list is empty")
        if self.indices is not None and len(self.indices) == 0:
            raise DataError("forget indices: the list is empty")

    @property
    def kind(self) -> str:
        return "class" if self.classes is not None else "fraction" if self.fraction is not None else "indices"

    @classmethod
    def from_options(
        cls,
        classes: Sequence[int | str] | None = None,
        fraction: float | None = None,
        indices_file: str | os.PathLike | None = None,
        *,
        seed: int = 0,
        required: bool = True,
        prefix: str = "forget",
    ) -> ForgetSpec | None:
        """The spec from the three ways a user names it (the CLI's ``--{prefix}-classes``,
        ``--{prefix}-fraction``, ``--{prefix}-indices``): exactly one, or none when not ``required``."""
        given = [x is not None for x in (classes, fraction, indices_file)]
        flags = f"--{prefix}-classes, --{prefix}-fraction or --{prefix}-indices"
        if sum(given) == 0:
            if required:
                raise InvalidInputError(f"say what to forget: {flags}")
            return None
        if sum(given) > 1:
            raise InvalidInputError(f"give only one of {flags}")
        if indices_file is not None:
            return cls.from_indices_file(indices_file)
        if fraction is not None:
            return cls(fraction=fraction, seed=seed)
        return cls(classes=tuple(classes or ()))

    @classmethod
    def from_indices_file(cls, path: str | os.PathLike) -> ForgetSpec:
        """Indices as JSON (a list) or text (integers separated by whitespace or commas)."""
        p = Path(path)
        if not p.is_file():
            raise DataError(f"forget index file not found: {p}")
        text = p.read_text()
        try:
            if p.suffix.lower() == ".json":
                raw = json.loads(text)
                if not isinstance(raw, list):
                    raise ValueError("expected a JSON list of integers")
                values = [int(v) for v in raw]
            else:
                values = [int(t) for t in re.split(r"[\s,]+", text.strip()) if t]
        except (ValueError, TypeError) as e:
            raise DataError(f"forget index file {p} must hold integers: {e}") from e
        return cls(indices=tuple(values), indices_source=str(p))

    @classmethod
    def from_description(cls, d: dict[str, Any], indices_file: str | os.PathLike | None = None) -> ForgetSpec:
        """Rebuild a spec from :meth:`describe`'s record (an index spec needs its file, checked by hash)."""
        kind = d.get("kind")
        if kind == "class":
            return cls(classes=tuple(int(c) for c in d["classes"]))
        if kind == "fraction":
            return cls(fraction=float(d["fraction"]), seed=int(d.get("seed", 0)))
        if kind == "indices":
            if indices_file is None:
                raise DataError("this result forgets an index set: pass the same --forget-indices FILE")
            spec = cls.from_indices_file(indices_file)
            if spec.describe()["indices_sha256"] != d.get("indices_sha256"):
                raise DataError(f"index file {indices_file} differs from the one recorded (sha256 mismatch)")
            return spec
        raise DataError(f"unknown forget record {d!r}")

    def describe(self, ds: Dataset | None = None) -> dict[str, Any]:
        """What this spec forgets, for manifests and reports."""
        if self.classes is not None:
            idx = [ds.class_index(c) for c in self.classes] if ds is not None else list(self.classes)
            d: dict[str, Any] = {"kind": "class", "classes": idx}
            if ds is not None:
                d["labels"] = [ds.classes[i] for i in idx]
            return d
        if self.fraction is not None:
            return {"kind": "fraction", "fraction": float(self.fraction), "seed": int(self.seed)}
        assert self.indices is not None
        return {
            "kind": "indices",
            "count": len(set(self.indices)),
            "indices_sha256": _index_hash(np.asarray(self.indices)),
            "file": Path(self.indices_source).name if self.indices_source else None,
        }

    def resolve(self, ds: Dataset, held_out: np.ndarray | None = None) -> ForgetSplit:
        """Forget, retain and test indices on ``ds``; ``held_out`` training indices (the classifier's
        validation split) belong to neither set, and a fraction is drawn from the others."""
        n = len(ds.y_train)
        all_idx = np.arange(n)
        out = np.zeros(n, bool)
        if held_out is not None and len(held_out):
            out[np.asarray(held_out, np.int64)] = True
        test_forgotten = np.zeros(0, np.int64)
        classes: tuple[int, ...] | None = None
        if self.classes is not None:
            classes = tuple(sorted({ds.class_index(c) for c in self.classes}))
            mask = np.isin(ds.y_train, classes) & ~out
            test_mask = np.isin(ds.y_test, classes)
            test = np.flatnonzero(~test_mask)
            test_forgotten = np.flatnonzero(test_mask)
        elif self.fraction is not None:
            pool = np.flatnonzero(~out)
            k = int(round(float(self.fraction) * len(pool)))
            rng = np.random.default_rng(self.seed)
            mask = np.zeros(n, bool)
            mask[rng.choice(pool, k, replace=False)] = True
            test = np.arange(len(ds.y_test))
        else:
            idx = np.asarray(sorted(set(self.indices or ())), np.int64)
            bad = idx[(idx < 0) | (idx >= n)]
            if len(bad):
                raise DataError(f"forget indices out of range [0, {n}): {bad[:5].tolist()}")
            if out[idx].any():
                raise DataError(
                    f"forget indices {idx[out[idx]][:5].tolist()} lie in the classifier's held-out validation split: "
                    "the model never trained on them, so there is nothing to forget"
                )
            mask = np.zeros(n, bool)
            mask[idx] = True
            test = np.arange(len(ds.y_test))
        forget, retain = all_idx[mask], all_idx[~mask & ~out]
        if len(forget) == 0:
            raise DataError(f"forget spec {self.describe()} selects no training sample of {ds.name}")
        if len(retain) == 0:
            raise DataError(f"forget spec {self.describe()} leaves no training sample to retain")
        if len(test) == 0:
            raise DataError(f"forget spec {self.describe()} leaves no test sample to measure TA on")
        return ForgetSplit(forget, retain, test, test_forgotten, classes, all_idx[out])
