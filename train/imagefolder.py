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
import math
import os
import shutil
import stat
import tarfile
import tempfile
import warnings
import zipfile
import zlib
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
    if not (math.isfinite(v) and v > 0):
        raise InvalidInputError(f"memory size must be finite and > 0, got {text!r}")
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


#: an image file larger than this is refused before it is read (no image needs it; a zip bomb would)
MAX_MEMBER_BYTES = 256 << 20
#: an image with more pixels than this is refused before it is decoded (10,000 x 10,000)
MAX_PIXELS = 100_000_000
_READ_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, RuntimeError, NotImplementedError, zlib.error)


def _show(rel: str) -> str:
    """A path for a message (a name that is not UTF-8 is shown with replacement characters)."""
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class _Source:
    """Lists and reads the images of a folder or an archive by relative path."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stats: dict[str, os.stat_result] | None = None
        name = path.name.lower()
        self.kind = "dir" if path.is_dir() else next((a for a in _ARCHIVES if name.endswith(a)), None)
        if not path.exists():
            raise DataError(f"ImageFolder source not found: {path}")
        if self.kind is None:
            raise DataError(f"ImageFolder source {path} is neither a folder nor a {'/'.join(_ARCHIVES)} archive")

    def stats(self) -> dict[str, os.stat_result]:
        """Relative path -> stat of every regular file below the folder, following symbolic links (each
        real folder once: no cycles); walked once, then kept (the listing and the cache key share it)."""
        if self._stats is None:
            out: dict[str, os.stat_result] = {}
            seen: set[str] = set()
            for root, dirs, names in os.walk(self.path, followlinks=True):
                real = os.path.realpath(root)
                if real in seen:
                    dirs[:] = []
                    continue
                seen.add(real)
                for n in names:
                    p = Path(root) / n
                    try:
                        st = p.stat()
                    except OSError:  # a dangling link
                        continue
                    if stat.S_ISREG(st.st_mode):
                        out[p.relative_to(self.path).as_posix()] = st
            self._stats = out
        return self._stats

    def files(self) -> list[str]:
        """Relative paths of every regular file (images and splits.csv); links and duplicates refused."""
        try:
            if self.kind == "dir":
                return sorted(self.stats())
            if self.kind == ".zip":
                with zipfile.ZipFile(self.path) as z:
                    names = [i.filename for i in z.infolist() if not i.is_dir()]
            else:
                names = []
                with tarfile.open(self.path, "r:*") as tf:
                    for m in tf:
                        if (m.islnk() or m.issym()) and m.name.lower().endswith(IMAGE_EXTENSIONS):
                            raise DataError(
                                f"{self.path}: {_show(m.name)} is a link inside the archive; links are not "
                                "supported there (archive the files themselves)"
                            )
                        if m.isfile():
                            names.append(m.name)
        except _READ_ERRORS as e:
            raise DataError(f"cannot read archive {self.path}: {e}") from e
        dup = sorted({n for n in names if names.count(n) > 1}) if len(set(names)) != len(names) else []
        if dup:
            raise DataError(f"{self.path} holds {len(dup)} names more than once, e.g. {_show(dup[0])}")
        return sorted(names)

    def _zip_member(self, z: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
        if info.flag_bits & 0x1:
            raise DataError(f"{_show(info.filename)} in {self.path} is encrypted")
        if info.file_size > MAX_MEMBER_BYTES:
            raise DataError(
                f"{_show(info.filename)} in {self.path} inflates to {info.file_size} bytes, over the "
                f"{MAX_MEMBER_BYTES >> 20} MiB an image may have"
            )
        return z.read(info)

    def _file(self, p: Path, rel: str) -> bytes:
        if p.stat().st_size > MAX_MEMBER_BYTES:
            raise DataError(f"{_show(rel)} is over the {MAX_MEMBER_BYTES >> 20} MiB an image may have")
        return p.read_bytes()

    def read(self, rel: str) -> bytes:
        try:
            if self.kind == "dir":
                return self._file(self.path / rel, rel)
            if self.kind == ".zip":
                with zipfile.ZipFile(self.path) as z:
                    return self._zip_member(z, z.getinfo(rel))
            with tarfile.open(self.path, "r:*") as tf:
                m = tf.getmember(rel)
                f = tf.extractfile(m) if m.size <= MAX_MEMBER_BYTES else None
                if f is None:
                    raise DataError(f"{_show(rel)} in {self.path} is not a regular file of a plausible size")
                return f.read()
        except (*_READ_ERRORS, KeyError) as e:
            raise DataError(f"cannot read {_show(rel)} from {self.path}: {e}") from e

    def stream(self, wanted: set[str]) -> Iterator[tuple[str, bytes]]:
        """(relative path, bytes) of the wanted files, in the source's own order (one pass over an archive)."""
        try:
            if self.kind == "dir":
                for rel in sorted(wanted):
                    yield rel, self._file(self.path / rel, rel)
            elif self.kind == ".zip":
                with zipfile.ZipFile(self.path) as z:
                    for i in z.infolist():
                        if i.filename in wanted:
                            yield i.filename, self._zip_member(z, i)
            else:
                with tarfile.open(self.path, "r|*") as tf:  # streaming mode: no seeking in a .tar.gz
                    for m in tf:
                        if m.isfile() and m.name in wanted:
                            if m.size > MAX_MEMBER_BYTES:
                                raise DataError(
                                    f"{_show(m.name)} in {self.path} is over the {MAX_MEMBER_BYTES >> 20} MiB "
                                    "an image may have"
                                )
                            f = tf.extractfile(m)
                            if f is not None:
                                yield m.name, f.read()
        except _READ_ERRORS as e:
            raise DataError(f"cannot read {self.path}: {e}") from e


def _split_of(rel: str, split_file: dict[str, str] | None, root: str = "") -> tuple[str, str] | None:
    """(split, class) of an image, or None when it is not part of the data set. The class is the first
    folder under the split (images in sub-folders of a class belong to it, as in torchvision)."""
    if not rel.lower().endswith(IMAGE_EXTENSIONS):
        return None
    if split_file is not None:
        split = split_file.get(rel)
        parts = rel[len(root) :].split("/")
        if split is None or len(parts) < 2:
            return None
        return split, parts[0]
    parts = rel.split("/")
    # train/<class>/.../<file> anywhere below the root (an archive often wraps the tree in one folder)
    for i, part in enumerate(parts[:-2]):
        if part in ("train", "test", "val"):
            return part, parts[i + 1]
    return None


def _read_split_file(src: _Source, files: list[str]) -> tuple[dict[str, str], str] | None:
    cands = [f for f in files if f.rsplit("/", 1)[-1] == "splits.csv"]
    if not cands:
        return None
    rel = min(cands, key=len)
    root = rel[: -len("splits.csv")]
    out: dict[str, str] = {}
    text = src.read(rel).decode("utf-8-sig", "replace")
    present = set(files)
    missing: list[str] = []
    for n, row in enumerate(csv.reader(io.StringIO(text)), 1):
        if not row or row[0].startswith("#"):
            continue
        if len(row) != 2 or row[1].strip() not in ("train", "test", "val"):
            raise DataError(f"{src.path}/{rel} line {n}: want 'relative/path,train|test|val', got {row!r}")
        path, split = root + row[0].strip(), row[1].strip()
        if out.get(path, split) != split:
            raise DataError(f"{src.path}/{rel} line {n}: {row[0].strip()} is listed as {out[path]} and as {split}")
        if path not in present:
            missing.append(row[0].strip())
        out[path] = split
    if missing:
        raise DataError(f"{src.path}/{rel} lists {len(missing)} file(s) that are not there, e.g. {missing[:3]}")
    return out, root


# --------------------------------------------------------------------------- decoding


def _decode_chunk(blobs: list[tuple[str, bytes]], hw: tuple[int, int] | None) -> np.ndarray:
    """Decode, RGB-convert, resize (shorter side) and center-crop a chunk; a bad file is named."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # PIL itself refuses twice this at open; we refuse MAX_PIXELS below
    arrs = []
    for rel, b in blobs:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(b)) as im:
                    if im.width * im.height > MAX_PIXELS:
                        raise DataError(
                            f"image {_show(rel)} is {im.width}x{im.height}, over {MAX_PIXELS:,} pixels: refused "
                            "before decoding"
                        )
                    if hw is not None:
                        im.draft("RGB", (hw[1], hw[0]))  # JPEG: decode at a reduced scale where it can
                    rgb = _to_rgb(im)
                    if hw is not None:
                        rgb = ImageOps.fit(rgb, (hw[1], hw[0]), Image.Resampling.BILINEAR)
                    a = np.asarray(rgb, np.uint8)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
            raise DataError(f"cannot decode image {_show(rel)}: {e}") from e
        arrs.append(a)
    shapes = {a.shape for a in arrs}
    if len(shapes) > 1:
        raise DataError(
            f"images differ in size ({sorted(shapes)[:3]}...) and no image size was given: pass --image-size "
            "(or use a model, whose IOSpec fixes the size)"
        )
    return np.stack(arrs).transpose(0, 3, 1, 2).copy()


def _to_rgb(im):
    """8-bit RGB of any PIL image: 16-bit and 32-bit integer greyscale is scaled (PIL's own conversion
    clips it at 255), float greyscale read as [0, 1] (or [0, 255] when it exceeds 1)."""
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        a = np.asarray(im, np.float64)
        if im.mode == "F":
            a = a * 255.0 if a.size and np.nanmax(a) <= 1.0 else a
        elif im.mode.startswith("I;16") or (a.size and a.max() > 255):
            a = a / 257.0 if a.max() <= 65535 else a * (255.0 / max(a.max(), 1.0))
        a = np.clip(np.nan_to_num(a), 0, 255)
        return Image.fromarray(np.round(a).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")


def decode_pool(workers: int) -> ProcessPoolExecutor:
    """Worker processes for decoding, started fresh ("spawn"), never forked: a fork of a process with
    threads (a server, onnxruntime's pools, a test run) can copy a lock held by another thread and hang."""
    import multiprocessing

    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


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
        pool = decode_pool(workers)
        try:
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
        finally:  # on an error, chunks not yet started are dropped rather than decoded for nothing
            pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- loading


def _source_key(src: _Source, hw: tuple[int, int] | None) -> str:
    """The cache key: for a folder every file's path, size, modification and change times and inode (a
    rewrite that keeps size and mtime still changes ctime), for an archive its sha256; and the size."""
    h = hashlib.sha256()
    if src.kind == "dir":
        for rel, st in sorted(src.stats().items()):
            line = f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\n"
            h.update(line.encode("utf-8", "surrogateescape"))
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
    listed = _read_split_file(src, files)
    split_file, root = listed if listed is not None else (None, "")
    entries: dict[str, list[tuple[str, str]]] = {"train": [], "test": [], "val": []}
    for rel in files:
        sc = _split_of(rel, split_file, root)
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
    index = {c: i for i, c in enumerate(classes)}
    tmp = None
    if folder is not None:
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
        except OSError as e:
            raise DataError(
                f"cannot use the data cache at {folder.parent} ({e}): set FORGETRT_CACHE_DIR to a writable folder"
            ) from e
    try:
        for split in ("train", "test"):
            shape = (n[split], 3, *hw_eff)
            x = (
                np.lib.format.open_memmap(tmp / f"x_{split}.npy", "w+", np.uint8, shape)
                if tmp is not None
                else np.zeros(shape, np.uint8)
            )
            order = {rel: i for i, (rel, _) in enumerate(entries[split])}
            _decode_into(src, order, x, hw, workers)
            y = np.array([index[c] for _, c in entries[split]], np.int64)
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
    except OSError as e:  # the cache's disk (full, read-only): the source itself was readable
        raise DataError(f"cannot write the decoded images to the data cache {folder}: {e}") from e
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
