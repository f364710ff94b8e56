import io
import json
import pickle
import tarfile

import numpy as np
import pytest

from forgetrt.runtime.errors import DataError, InvalidInputError, UnknownNameError
from forgetrt.train.data import CIFAR10_CLASSES, ForgetSpec, load_data, parse_data_spec, parse_subset


def test_digits_split(digits):
    assert digits.shape == (1, 8, 8) and digits.num_classes == 10
    assert len(digits.y_train) + len(digits.y_test) == 1797
    assert digits.x_train.dtype == np.uint8 and digits.x_train.max() <= 16
    mean, std = digits.channel_stats()
    assert 0 < mean[0] < 1 and 0 < std[0] < 1


@pytest.mark.parametrize(
    "spec, err, msg",
    [
        ("", InvalidInputError, "empty"),
        ("mnist", UnknownNameError, "unknown data spec kind 'mnist'; valid: digits, cifar10:PATH"),
        ("cifar10", InvalidInputError, "needs a path"),
        ("digits:/x", InvalidInputError, "takes no path"),
    ],
)
def test_bad_data_specs(spec, err, msg):
    with pytest.raises(err, match=msg):
        parse_data_spec(spec)


@pytest.mark.parametrize("text", ["", "10", "10,x", "10,20,30", "0,5", "5,-1", "1.5,2", " ,3"])
def test_bad_subsets_are_typed_errors(text):
    with pytest.raises(InvalidInputError, match="bad subset"):
        parse_subset(text)


def test_subset_sizes_parse_and_draw(digits):
    assert parse_subset("100, 50") == (100, 50)
    small = digits.subset(*parse_subset("100,50"), seed=0)
    assert len(small.y_train) == 100 and len(small.y_test) == 50


def test_missing_cifar_source(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_data(f"cifar10:{tmp_path / 'nope.tar.gz'}")


def _png(rgb: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), rgb).save(buf, format="PNG")
    return buf.getvalue()


def _tree_items(per_class=2):
    for split in ("train", "test"):
        for ci, cls in enumerate(CIFAR10_CLASSES):
            for k in range(per_class):
                yield f"cifar10/{split}/{cls}/{k:04d}.png", _png((ci * 20, k * 50, 7))


def test_image_folder_and_tar_agree_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGETRT_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "tree"
    tar_path = tmp_path / "c.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tf:
        for name, blob in _tree_items():
            p = root / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(blob)
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    a = load_data(f"cifar10:{root}")
    b = load_data(f"cifar10:{tar_path}")
    assert a.classes == b.classes == CIFAR10_CLASSES
    assert a.x_train.shape == (20, 3, 32, 32) and a.x_test.shape == (20, 3, 32, 32)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_train, b.y_train)
    assert a.x_train[a.y_train == 3][0, 0, 0, 0] == 60  # red channel encodes the class
    cached = list((tmp_path / "cache" / "datasets").glob("*.npz"))
    assert len(cached) == 2
    c = load_data(f"cifar10:{tar_path}")  # from the cache now
    np.testing.assert_array_equal(c.x_test, b.x_test)


def test_corrupt_archive_and_bad_trees(tmp_path):
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"\x1f\x8b\x08 this is not gzip data")
    with pytest.raises(DataError, match="cannot read archive"):
        load_data(f"cifar10:{bad}", cache=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images"):
        load_data(f"cifar10:{empty}", cache=False)
    broken = tmp_path / "broken" / "train" / "cat"
    broken.mkdir(parents=True)
    (broken / "x.jpg").write_bytes(b"garbage")
    (tmp_path / "broken" / "test" / "cat").mkdir(parents=True)
    (tmp_path / "broken" / "test" / "cat" / "y.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot decode"):
        load_data(f"cifar10:{tmp_path / 'broken'}", cache=False)


def _write_batches(root, n_per_batch=4):
    rng = np.random.default_rng(0)
    root.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {
            b"data": rng.integers(0, 255, (n_per_batch, 3072), dtype=np.uint8),
            b"labels": list(rng.integers(0, 10, n_per_batch)),
        }
        (root / name).write_bytes(pickle.dumps(d))
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [c.encode() for c in CIFAR10_CLASSES]}))


def test_cifar_python_batches(tmp_path):
    _write_batches(tmp_path / "cifar-10-batches-py")
    ds = load_data(f"cifar10:{tmp_path}", cache=False)
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
    assert ds.classes == CIFAR10_CLASSES


def test_cifar_batches_refuse_arbitrary_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned",))

    root = tmp_path / "cifar-10-batches-py"
    _write_batches(root)
    (root / "data_batch_1").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(DataError, match="refusing to load global"):
        load_data(f"cifar10:{root}", cache=False)


def test_forget_specs(digits, tmp_path):
    cls = ForgetSpec(classes=(0, "3")).resolve(digits)
    assert set(digits.y_train[cls.forget]) == {0, 3} and cls.classes == (0, 3)
    assert not np.isin(digits.y_test[cls.test], [0, 3]).any()
    assert set(digits.y_test[cls.test_forgotten]) == {0, 3}
    assert len(cls.forget) + len(cls.retain) == len(digits.y_train)

    fr = ForgetSpec(fraction=0.1, seed=1).resolve(digits)
    assert len(fr.forget) == round(0.1 * len(digits.y_train))
    np.testing.assert_array_equal(fr.forget, ForgetSpec(fraction=0.1, seed=1).resolve(digits).forget)
    assert not np.array_equal(fr.forget, ForgetSpec(fraction=0.1, seed=2).resolve(digits).forget)

    (tmp_path / "idx.txt").write_text("5, 7\n9 5")
    (tmp_path / "idx.json").write_text(json.dumps([9, 7, 5]))
    a = ForgetSpec.from_indices_file(tmp_path / "idx.txt")
    b = ForgetSpec.from_indices_file(tmp_path / "idx.json")
    np.testing.assert_array_equal(a.resolve(digits).forget, [5, 7, 9])
    assert a.describe()["indices_sha256"] == b.describe()["indices_sha256"]
    assert ForgetSpec.from_description(b.describe(), tmp_path / "idx.txt").resolve(digits).forget.tolist() == [5, 7, 9]


@pytest.mark.parametrize(
    "make, err, msg",
    [
        (lambda: ForgetSpec(fraction=0.0), InvalidInputError, r"fraction must be in \(0, 1\)"),
        (lambda: ForgetSpec(fraction=1.0), InvalidInputError, r"fraction must be in \(0, 1\)"),
        (lambda: ForgetSpec(), InvalidInputError, "exactly one"),
        (lambda: ForgetSpec(classes=(1,), fraction=0.1), InvalidInputError, "exactly one"),
        (lambda: ForgetSpec(classes=()), InvalidInputError, "empty"),
        (lambda: ForgetSpec(indices=()), DataError, "empty"),
    ],
)
def test_bad_forget_specs(make, err, msg):
    with pytest.raises(err, match=msg):
        make()


def test_forget_spec_resolution_errors(digits, tmp_path):
    with pytest.raises(UnknownNameError, match="unknown class 12"):
        ForgetSpec(classes=(12,)).resolve(digits)
    with pytest.raises(UnknownNameError, match="unknown class 'cat'"):
        ForgetSpec(classes=("cat",)).resolve(digits)
    with pytest.raises(DataError, match="no training sample to retain"):
        ForgetSpec(classes=tuple(range(10))).resolve(digits)
    with pytest.raises(DataError, match="out of range"):
        ForgetSpec(indices=(0, 10**6)).resolve(digits)
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        ForgetSpec.from_indices_file(tmp_path / "empty.txt")
    (tmp_path / "words.txt").write_text("1 two 3")
    with pytest.raises(DataError, match="integers"):
        ForgetSpec.from_indices_file(tmp_path / "words.txt")
    with pytest.raises(DataError, match="not found"):
        ForgetSpec.from_indices_file(tmp_path / "missing.txt")


@pytest.mark.needs_data
def test_shared_cifar10_archive():
    from conftest import CIFAR_TAR

    ds = load_data(f"cifar10:{CIFAR_TAR}")
    assert ds.x_train.shape == (50000, 3, 32, 32) and ds.x_test.shape == (10000, 3, 32, 32)
    assert ds.classes == CIFAR10_CLASSES
    assert np.bincount(ds.y_train).tolist() == [5000] * 10
    assert np.bincount(ds.y_test).tolist() == [1000] * 10
