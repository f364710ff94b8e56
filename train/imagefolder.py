"""``imagefolder:PATH``: any ImageFolder data set (any classes, any image sizes), resized to one size.

Layout, in a folder or a ``.tar``/``.tar.gz``/``.tgz``/``.zip`` archive of one::

    train/<class>/*.jpg|png|...     required
    test/<class>/*                  the test split (``val/`` is used when there is no ``test/``)

or any ``<class>/<file>`` tree with a ``splits.csv`` at its root whose lines are ``relative/path,split``
(split ``train``, ``test`` or ``val``; ``val`` counts as test; images it does not list are left out).

Every image is converted to RGB, resized so its shorter side is the target size and center-cropped to
H×W (the size a model's IOSpec records, or ``--image-size``). Decoding runs in worker processes, a
chunk of images per task with a bounded number of chunks in flight, straight into an uint8 ``.npy``
cache on disk (``$FORGETRT_CACHE_DIR/datasets``, keyed by the source's hash and the size). A set whose
decoded size fits ``memory_cap`` (``$FORGETRT_DATA_MEMORY_CAP``, default 4 GiB) is read into memory;
a larger one is memory-mapped, so host memory holds only the pages in use and training streams its
batches from the page cache (``DeviceData`` keeps such a set on the host, not on the GPU).

A file that is not a decodable image is a :class:`DataError` naming it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np

from forgetrt.runtime.errors import DataError, InvalidInputError

__all__ = ["load_imagefolder", "parse_memory", "memory_cap", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
_ARCHIVES = (".tar", ".tar.gz", ".tgz", ".zip")
_CHUNK = 256  # images per worker task
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_memory(text: str | int) -> int:
    """'4G', '512m', '1000000' -> bytes."""
    if isinstance(text, int):
        return text
    t = str(text).strip().lower().removesuffix("b").removesuffix("i")
    unit = t[-1:] if t[-1:] in _UNITS else ""
    try:
        v = float(t[: len(t) - len(unit)])
    except ValueError:
        raise InvalidInputError(f"memory size {text!r}: want bytes or a number with k, M, G or T") from None
    if not v > 0:
        raise InvalidInputError(f"memory size must be > 0, got {text!r}")
    return int(v * _UNITS[unit])


def memory_cap() -> int:
    return parse_memory(os.environ.get("FORGETRT_DATA_MEMORY_CAP") or "4G")


def _size(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if not (0 < h <= 4096 and 0 < w <= 4096):
        raise InvalidInputError(f"image size must be 1..4096 pixels, got {h}x{w}")
    return h, w


# --------------------------------------------------------------------------- listing


class _Source:
    """Lists and reads the images of a folder or an archive by relative path."""

    def __init__(self, path: Path) -> None:
        self.path = path
        name = path.name.lower()
        self.kind = "dir" if path.is_dir() else next((a for a in _ARCHIVES if name.endswith(a)), None)
        if not path.exists():
            raise DataError(f"ImageFolder source not found: {path}")
        if self.kind is None:
            raise DataError(f"ImageFolder source {path} is neither a folder nor a {'/'.join(_ARCHIVES)} archive")

    def files(self) -> list[str]:
        """Relative paths of every regular file (images and splits.csv)."""
        try:
            if self.kind == "dir":
                return sorted(p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file())
            if self.kind == ".zip":
                with zipfile.ZipFile(self.path) as z:
                    return sorted(i.filename for i in z.infolist() if not i.is_dir())
            with tarfile.open(self.path, "r:*") as tf:
                return sorted(m.name for m in tf if m.isfile())
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
            raise DataError(f"cannot read archive {self.path}: {e}") from e

    def read(self, rel: str) -> bytes:
        try:
            if self.kind == "dir":
                return (self.path / rel).read_bytes()
            if self.kind == ".zip":
                with zipfile.ZipFile(self.path) as z:
                    return z.read(rel)
            with tarfile.open(self.path, "r:*") as tf:
                f = tf.extractfile(rel)
                if f is None:
                    raise DataError(f"{rel} in {self.path} is not a regular file")
                return f.read()
        except (tarfile.TarError, zipfile.BadZipFile, KeyError, EOFError, OSError) as e:
            raise DataError(f"cannot read {rel} from {self.path}: {e}") from e

    def stream(self, wanted: set[str]) -> Iterator[tuple[str, bytes]]:
        """(relative path, bytes) of the wanted files, in the source's own order (one pass over an archive)."""
        try:
            if self.kind == "dir":
                for rel in sorted(wanted):
                    yield rel, (self.path / rel).read_bytes()
            elif self.kind == ".zip":
                with zipfile.ZipFile(self.path) as z:
                    for i in z.infolist():
                        if i.filename in wanted:
                            yield i.filename, z.read(i)
            else:
                with tarfile.open(self.path, "r|*") as tf:  # streaming mode: no seeking in a .tar.gz
                    for m in tf:
                        if m.isfile() and m.name in wanted:
                            f = tf.extractfile(m)
                            if f is not None:
                                yield m.name, f.read()
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
            raise DataError(f"cannot read {self.path}: {e}") from e


def _split_of(rel: str, files: set[str], split_file: dict[str, str] | None) -> tuple[str, str] | None:
    """(split, class) of an image, or None when it is not part of the data set."""
    if not rel.lower().endswith(IMAGE_EXTENSIONS):
        return None
    parts = rel.split("/")
    if split_file is not None:
        split = split_file.get(rel)
        if split is None or len(parts) < 2:
            return None
        return split, parts[-2]
    # train/<class>/<file> anywhere below the root (an archive often wraps the tree in one folder)
    if len(parts) >= 3 and parts[-3] in ("train", "test", "val"):
        return parts[-3], parts[-2]
    return None


def _read_split_file(src: _Source, files: list[str]) -> dict[str, str] | None:
    cands = [f for f in files if f.rsplit("/", 1)[-1] == "splits.csv"]
    if not cands:
        return None
    rel = min(cands, key=len)
    root = rel[: -len("splits.csv")]
    out: dict[str, str] = {}
    text = src.read(rel).decode("utf-8", "replace")
    for n, row in enumerate(csv.reader(io.StringIO(text)), 1):
        if not row or row[0].startswith("#"):
            continue
        if len(row) != 2 or row[1].strip() not in ("train", "test", "val"):
            raise DataError(f"{src.path}/{rel} line {n}: want 'relative/path,train|test|val', got {row!r}")
        out[root + row[0].strip()] = row[1].strip()
    return out


# --------------------------------------------------------------------------- decoding


def _decode_chunk(blobs: list[tuple[str, bytes]], hw: tuple[int, int] | None) -> np.ndarray:
    """Decode, RGB-convert, resize (shorter side) and center-crop a chunk; a bad file is named."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = 200_000_000  # refuse decompression bombs beyond ~14k x 14k
    arrs = []
    for rel, b in blobs:
        try:
            with Image.open(io.BytesIO(b)) as im:
                if hw is not None:
                    im.draft("RGB", (hw[1], hw[0]))  # JPEG: decode at a reduced scale where it can
                    rgb = ImageOps.fit(im.convert("RGB"), (hw[1], hw[0]), Image.Resampling.BILINEAR)
                else:
                    rgb = im.convert("RGB")
                a = np.asarray(rgb, np.uint8)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"cannot decode image {rel}: {e}") from e
        arrs.append(a)
    shapes = {a.shape for a in arrs}
    if len(shapes) > 1:
        raise DataError(
            f"images differ in size ({sorted(shapes)[:3]}...) and no image size was given: pass --image-size "
            "(or use a model, whose IOSpec fixes the size)"
        )
    return np.stack(arrs).transpose(0, 3, 1, 2).copy()


def _decode_into(
    src: _Source, order: dict[str, int], out: np.ndarray, hw: tuple[int, int] | None, workers: int
) -> None:
    """Decode the images named in ``order`` (path -> row) into ``out`` rows, chunked over worker processes
    with at most 2 chunks per worker in flight (bounded memory whatever the set's size)."""
    from forgetrt.runtime.logs import progress

    def chunks() -> Iterator[list[tuple[str, bytes]]]:
        buf: list[tuple[str, bytes]] = []
        for rel, b in src.stream(set(order)):
            buf.append((rel, b))
            if len(buf) == _CHUNK:
                yield buf
                buf = []
        if buf:
            yield buf

    def place(chunk: list[tuple[str, bytes]], arr: np.ndarray) -> None:
        if arr.shape[1:] != out.shape[1:]:
            raise DataError(
                f"image {chunk[0][0]} decodes to {arr.shape[2]}x{arr.shape[3]}, others to "
                f"{out.shape[2]}x{out.shape[3]}: pass --image-size"
            )
        rows = np.array([order[rel] for rel, _ in chunk])
        out[rows] = arr

    with progress(total=len(order), desc="decode images", unit="img", leave=False) as bar:
        if workers <= 1:
            for c in chunks():
                place(c, _decode_chunk(c, hw))
                bar.update(len(c))
            return
        with ProcessPoolExecutor(workers) as pool:
            pending: dict[Future, list[tuple[str, bytes]]] = {}
            for c in chunks():
                pending[pool.submit(_decode_chunk, c, hw)] = c
                while len(pending) >= 2 * workers:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        place(pending.pop(f), f.result())
                        bar.update(len(f.result()))
            for f in list(pending):
                place(pending.pop(f), f.result())
                bar.update(len(f.result()))


# --------------------------------------------------------------------------- loading


def _source_key(src: _Source, hw: tuple[int, int] | None) -> str:
    h = hashlib.sha256()
    if src.kind == "dir":
        for p in sorted(q for q in src.path.rglob("*") if q.is_file()):
            st = p.stat()
            h.update(f"{p.relative_to(src.path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    else:
        from forgetrt.runtime.files import sha256_file

        h.update(sha256_file(src.path).encode())
    h.update(f"size={hw}\0v1".encode())
    return h.hexdigest()[:24]


def load_imagefolder(
    path: str | os.PathLike,
    *,
    image_size: int | tuple[int, int] | None = None,
    cache: bool = True,
    cap: int | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """The arrays of an ImageFolder source (x_train/y_train/x_test/y_test uint8 [N, 3, H, W], classes):
    in memory when their decoded size is within ``cap`` bytes, else memory-mapped from the cache."""
    from forgetrt.runtime.files import atomic_write_json

    from .data import cache_dir

    src = _Source(Path(path).expanduser())
    hw = _size(image_size)
    cap = memory_cap() if cap is None else int(cap)
    files = src.files()
    split_file = _read_split_file(src, files)
    fileset = set(files)
    entries: dict[str, list[tuple[str, str]]] = {"train": [], "test": [], "val": []}
    for rel in files:
        sc = _split_of(rel, fileset, split_file)
        if sc is not None:
            entries[sc[0]].append((rel, sc[1]))
    if not entries["test"]:
        entries["test"] = entries["val"]
    if not entries["train"] or not entries["test"]:
        raise DataError(
            f"{src.path}: want train/<class>/<image> and test/<class>/<image> (or val/), or a splits.csv; found "
            f"{len(entries['train'])} training and {len(entries['test'])} test images"
        )
    classes = sorted({c for _, c in entries["train"]})
    extra = sorted({c for _, c in entries["test"]} - set(classes))
    if extra:
        raise DataError(f"{src.path}: test classes {extra} have no training images")
    if len(classes) < 2:
        raise DataError(f"{src.path}: an ImageFolder needs at least 2 classes, found {classes}")
    n = {s: len(entries[s]) for s in ("train", "test")}
    if hw is None:  # the native size, which every image must share
        first = entries["train"][0][0]
        h0, w0 = _decode_chunk([(first, src.read(first))], None).shape[2:]
        hw_eff = (int(h0), int(w0))
    else:
        hw_eff = hw
    nbytes = (n["train"] + n["test"]) * 3 * hw_eff[0] * hw_eff[1]
    workers = workers if workers is not None else max(1, min(os.cpu_count() or 1, 8))

    folder = cache_dir() / "datasets" / f"imagefolder-{_source_key(src, hw)}" if cache else None
    if folder is not None and (folder / "meta.json").is_file():
        try:
            return _open(folder, nbytes <= cap)
        except (OSError, ValueError, KeyError) as e:
            shutil.rmtree(folder, ignore_errors=True)  # a broken cache entry is rebuilt, never trusted
            del e
    if folder is None and nbytes > cap:
        raise DataError(
            f"{src.path} decodes to {nbytes / 2**30:.1f} GiB, over the memory cap of {cap / 2**30:.1f} GiB, and "
            "the disk cache is off: enable the cache (it memory-maps large sets) or raise FORGETRT_DATA_MEMORY_CAP"
        )
    arrays: dict[str, Any] = {"classes": np.array(classes)}
    tmp = None
    if folder is not None:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        for split in ("train", "test"):
            shape = (n[split], 3, *hw_eff)
            x = (
                np.lib.format.open_memmap(tmp / f"x_{split}.npy", "w+", np.uint8, shape)
                if tmp is not None
                else np.empty(shape, np.uint8)
            )
            order = {rel: i for i, (rel, _) in enumerate(entries[split])}
            _decode_into(src, order, x, hw, workers)
            y = np.array([classes.index(c) for _, c in entries[split]], np.int64)
            if tmp is not None:
                x.flush()
                del x
                np.save(tmp / f"y_{split}.npy", y)
            else:
                arrays[f"x_{split}"], arrays[f"y_{split}"] = x, y
        if tmp is None:
            return arrays
        atomic_write_json(tmp / "meta.json", {"classes": classes, "size": list(hw_eff), "source": str(src.path)})
        try:
            tmp.rename(folder)
        except OSError:  # another process filled the cache first: use its copy
            shutil.rmtree(tmp, ignore_errors=True)
        tmp = None
        return _open(folder, nbytes <= cap)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _open(folder: Path, in_memory: bool) -> dict[str, Any]:
    meta = json.loads((folder / "meta.json").read_text())
    mode = None if in_memory else "r"
    out: dict[str, Any] = {"classes": np.array(meta["classes"])}
    for split in ("train", "test"):
        out[f"x_{split}"] = np.load(folder / f"x_{split}.npy", mmap_mode=mode, allow_pickle=False)
        out[f"y_{split}"] = np.load(folder / f"y_{split}.npy", allow_pickle=False)
        if len(out[f"x_{split}"]) != len(out[f"y_{split}"]):
            raise ValueError("cached images and labels differ in length")
    return out
