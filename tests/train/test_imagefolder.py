"""imagefolder:PATH: layouts, resizing, the disk cache, the memory cap, workers and typed errors."""

import os
import tarfile
import zipfile

import numpy as np
import pytest
from imagefolder_data import CLASSES, make_imagefolder
from PIL import Image

from forgetrt.runtime.errors import DataError, InvalidInputError
from forgetrt.train.data import load_data, parse_data_spec
from forgetrt.train.imagefolder import load_imagefolder, parse_memory


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGETRT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FORGETRT_DATA_MEMORY_CAP", raising=False)


@pytest.fixture
def folder(tmp_path):
    return make_imagefolder(tmp_path / "if", n_train=6, n_test=3)


def test_spec_kind_and_resize_to_any_size(folder):
    assert parse_data_spec(f"imagefolder:{folder}") == ("imagefolder", str(folder))
    ds = load_data(f"imagefolder:{folder}", image_size=(40, 56))
    assert ds.name == "imagefolder" and ds.classes == CLASSES and ds.shape == (3, 40, 56)
    assert ds.x_train.shape == (18, 3, 40, 56) and ds.x_test.shape == (9, 3, 40, 56) and ds.x_train.dtype == np.uint8
    assert np.bincount(ds.y_train).tolist() == [6, 6, 6] and ds.scale == 255.0
    # the class's colour channel survives resizing: the data are what the files hold, in label order
    means = ds.x_train.reshape(18, 3, -1).mean(-1)
    assert (means.argmax(1) == ds.y_train).all()


def test_native_size_must_be_uniform_unless_a_size_is_given(tmp_path):
    uniform = make_imagefolder(tmp_path / "u", n_train=2, n_test=1, size=(20, 30), vary=False)
    assert load_data(f"imagefolder:{uniform}").shape == (3, 20, 30)
    varied = make_imagefolder(tmp_path / "v", n_train=3, n_test=1)
    with pytest.raises(DataError, match="differ in size.*--image-size"):
        load_data(f"imagefolder:{varied}")


def test_archives_and_val_folder_and_split_file(tmp_path, folder):
    ref = load_data(f"imagefolder:{folder}", image_size=32)
    tgz = tmp_path / "set.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(folder, arcname="wrapped")  # an archive often wraps the tree in one folder
    a = load_data(f"imagefolder:{tgz}", image_size=32)
    zp = tmp_path / "set.zip"
    with zipfile.ZipFile(zp, "w") as z:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                z.write(p, p.relative_to(folder).as_posix())
    b = load_data(f"imagefolder:{zp}", image_size=32)
    for d in (a, b):
        assert d.classes == ref.classes
        assert np.array_equal(d.x_train, ref.x_train) and np.array_equal(d.y_test, ref.y_test)
    (folder / "test").rename(folder / "val")  # val/ stands in for a missing test/
    assert len(load_data(f"imagefolder:{folder}", image_size=32, cache=False).y_test) == 9
    flat = tmp_path / "flat"
    lines = []
    for split in ("train", "val"):
        for p in sorted((folder / split).rglob("*.*")):
            dst = flat / p.parent.name / f"{split}-{p.name}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(p.read_bytes())
            lines.append(f"{dst.relative_to(flat).as_posix()},{'train' if split == 'train' else 'test'}")
    (flat / "splits.csv").write_text("# path,split\n" + "\n".join(lines[:-1]) + "\n")  # one image left out
    c = load_data(f"imagefolder:{flat}", image_size=32)
    assert c.classes == CLASSES and len(c.y_train) == 18 and len(c.y_test) == 8
    (flat / "splits.csv").write_text("circle/train-000.jpg,holdout\n")
    with pytest.raises(DataError, match="line 1: want 'relative/path,train|test|val'"):
        load_data(f"imagefolder:{flat}", image_size=32)


def test_cache_reuse_and_memory_cap_memory_maps(folder, tmp_path, monkeypatch):
    a = load_imagefolder(folder, image_size=32)
    assert not isinstance(a["x_train"], np.memmap)  # small: in memory
    entries = list((tmp_path / "cache" / "datasets").iterdir())
    assert len(entries) == 1 and (entries[0] / "x_train.npy").is_file()
    (folder / "train" / "circle" / "000.jpg").unlink()  # the source changed: a new cache entry
    b = load_imagefolder(folder, image_size=32)
    assert len(b["y_train"]) == 17 and len(list((tmp_path / "cache" / "datasets").iterdir())) == 2
    monkeypatch.setenv("FORGETRT_DATA_MEMORY_CAP", "50k")  # 26 images x 3x32x32 = 80k bytes: over the cap
    c = load_imagefolder(folder, image_size=32)
    assert isinstance(c["x_train"], np.memmap) and np.array_equal(np.asarray(c["x_train"]), b["x_train"])
    with pytest.raises(DataError, match="over the memory cap of .* the disk cache is off"):
        load_imagefolder(folder, image_size=32, cache=False)
    assert parse_memory("4G") == 4 << 30 and parse_memory("512MiB") == 512 << 20 and parse_memory("1000") == 1000
    for bad in ("lots", "-1G", "0"):
        with pytest.raises(InvalidInputError):
            parse_memory(bad)


def test_workers_give_the_same_arrays_as_one_process(folder):
    one = load_imagefolder(folder, image_size=24, cache=False, workers=1)
    two = load_imagefolder(folder, image_size=24, cache=False, workers=2)
    assert np.array_equal(one["x_train"], two["x_train"]) and np.array_equal(one["x_test"], two["x_test"])


def test_bounded_decoding_of_a_larger_set(tmp_path, monkeypatch):
    """More images than one chunk per worker: decoding streams them in bounded chunks into the mapping."""
    import forgetrt.train.imagefolder as imf

    monkeypatch.setattr(imf, "_CHUNK", 4)
    inflight = []
    real = imf._decode_chunk

    def spy(chunk, hw):
        inflight.append(len(chunk))
        return real(chunk, hw)

    monkeypatch.setattr(imf, "_decode_chunk", spy)
    root = make_imagefolder(tmp_path / "big", n_train=10, n_test=2)
    monkeypatch.setenv("FORGETRT_DATA_MEMORY_CAP", "1k")
    a = load_imagefolder(root, image_size=16, workers=1)
    assert isinstance(a["x_train"], np.memmap) and max(inflight) == 4 and sum(inflight) == 36
    assert (a["x_train"].reshape(30, 3, -1).mean(-1).argmax(1) == a["y_train"]).all()


def test_corrupt_and_missing_give_typed_errors_naming_the_file(tmp_path, folder):
    bad = folder / "train" / "square" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="cannot decode image train/square/broken.png"):
        load_data(f"imagefolder:{folder}", image_size=32)
    with pytest.raises(DataError, match="cannot decode image train/square/broken.png"):
        load_imagefolder(folder, image_size=32, workers=2, cache=False)
    with pytest.raises(DataError, match="not found"):
        load_data(f"imagefolder:{tmp_path / 'nope'}", image_size=32)
    empty = tmp_path / "empty"
    (empty / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="want train/<class>/<image>"):
        load_data(f"imagefolder:{empty}", image_size=32)
    one = make_imagefolder(tmp_path / "one", n_train=1, n_test=1)
    for c in CLASSES[1:]:
        for split in ("train", "test"):
            for p in (one / split / c).iterdir():
                p.unlink()
            (one / split / c).rmdir()
    with pytest.raises(DataError, match="at least 2 classes"):
        load_data(f"imagefolder:{one}", image_size=32)
    odd = make_imagefolder(tmp_path / "odd", n_train=1, n_test=1)
    (odd / "test" / "extra").mkdir()
    Image.new("RGB", (8, 8)).save(odd / "test" / "extra" / "x.png")
    with pytest.raises(DataError, match=r"test classes \['extra'\] have no training images"):
        load_data(f"imagefolder:{odd}", image_size=32)
    with pytest.raises(InvalidInputError, match="1..4096"):
        load_data(f"imagefolder:{folder}", image_size=0)
    txt = tmp_path / "x.txt"
    txt.write_text("hi")
    with pytest.raises(DataError, match="neither a folder nor"):
        load_data(f"imagefolder:{txt}", image_size=32)
    with pytest.raises(InvalidInputError, match="only imagefolder data are resized"):
        load_data("digits", image_size=32)


def test_broken_cache_entry_is_rebuilt(folder, tmp_path):
    a = load_imagefolder(folder, image_size=16)
    (entry,) = (tmp_path / "cache" / "datasets").iterdir()
    (entry / "x_train.npy").write_bytes(b"garbage")
    b = load_imagefolder(folder, image_size=16)
    assert np.array_equal(a["x_train"], b["x_train"])


def test_streamed_device_data_matches_in_memory(folder, tmp_path, monkeypatch):
    import torch

    from forgetrt.train.loops import DeviceData

    monkeypatch.setenv("FORGETRT_DATA_MEMORY_CAP", "1k")
    ds = load_data(f"imagefolder:{folder}", image_size=16)
    assert isinstance(ds.x_train, np.memmap)
    rows = np.array([5, 1, 9, 3])
    streamed = DeviceData(ds.x_train, ds.y_train, ds.scale, torch.device("cpu"), rows=rows)
    plain = DeviceData(np.asarray(ds.x_train)[rows], ds.y_train[rows], ds.scale, torch.device("cpu"))
    idx = torch.tensor([3, 0, 2])
    assert streamed.streamed and not plain.streamed and len(streamed) == 4
    assert torch.equal(streamed.images(idx), plain.images(idx)) and torch.equal(streamed.y, plain.y)
    assert torch.equal(streamed.images(slice(1, 3)), plain.images(slice(1, 3)))


def test_memory_mapped_set_trains_and_evaluates_like_an_in_memory_one(tmp_path, monkeypatch):
    """The whole path (classifier, vector with calibration, eval, RL baseline) on a set memory-mapped from
    the cache gives the same numbers as on the same set held in memory."""
    from forgetrt.train import workflows as wf
    from forgetrt.train.data import ForgetSpec
    from forgetrt.train.recipes import VectorRecipe

    root = make_imagefolder(tmp_path / "if", n_train=12, n_test=4)
    results = {}
    for mode, cap in (("memory", "1G"), ("mapped", "1k")):
        monkeypatch.setenv("FORGETRT_DATA_MEMORY_CAP", cap)
        ds = load_data(f"imagefolder:{root}", image_size=32)
        assert isinstance(ds.x_train, np.memmap) == (mode == "mapped")
        m, bank = tmp_path / f"m-{mode}", tmp_path / f"b-{mode}"
        rec = wf.train_model("cifar-small", ds, m, epochs=2, device="cpu", batch_size=8, val_fraction=0.25)
        spec = ForgetSpec(classes=(1,))
        wf.train_vector(m, ds, bank, {"v": spec}, VectorRecipe(epochs=1, batch_size=8), device="cpu")
        ev = wf.evaluate_result(m, ds, bank_dir=bank, vector="v", device="cpu")
        wf.unlearn_baseline("rl", m, ds, spec, tmp_path / f"rl-{mode}", epochs=1, device="cpu")
        rl = wf.evaluate_result(tmp_path / f"rl-{mode}", ds, forget=spec, device="cpu")
        results[mode] = (rec["metrics"], {k: ev[k] for k in ("UA", "RA", "TA", "TA_original")}, rl["RA"])
    assert results["memory"] == results["mapped"]


# --------------------------------------------------------------------------- hostile and odd sources


def _zip_of(folder, dst):
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                z.write(p, p.relative_to(folder).as_posix())
    return dst


def test_archive_oddities_are_typed_errors(tmp_path, folder, monkeypatch):
    import forgetrt.train.imagefolder as imf

    enc = tmp_path / "enc.zip"
    data = bytearray(_zip_of(folder, tmp_path / "plain.zip").read_bytes())
    for sig, at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # mark every entry encrypted (bit 0 of its flags)
        i = data.find(sig)
        while i >= 0:
            data[i + at] |= 0x1
            i = data.find(sig, i + 4)
    enc.write_bytes(bytes(data))
    with pytest.raises(DataError, match="is encrypted"):
        load_data(f"imagefolder:{enc}", image_size=16)
    good = _zip_of(folder, tmp_path / "good.zip")
    raw = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as z:  # scribble over the first member's compressed data
        off = z.infolist()[0].header_offset + 30 + len(z.infolist()[0].filename)
    raw[off : off + 40] = b"\xff" * 40
    bad = tmp_path / "bad.zip"
    bad.write_bytes(bytes(raw))
    with pytest.raises(DataError):
        load_data(f"imagefolder:{bad}", image_size=16)
    dup = tmp_path / "dup.zip"
    with zipfile.ZipFile(dup, "w") as z, pytest.warns(UserWarning, match="Duplicate name"):
        for p in sorted(folder.rglob("*.*")):
            z.write(p, p.relative_to(folder).as_posix())
        z.write(next(folder.rglob("*.png")), "train/circle/001.png")
    with pytest.raises(DataError, match="names more than once"):
        load_data(f"imagefolder:{dup}", image_size=16)
    linked = tmp_path / "linked.tar"
    with tarfile.open(linked, "w") as tf:
        tf.add(folder, arcname=".")
        info = tarfile.TarInfo("train/circle/zz-link.png")
        info.type, info.linkname = tarfile.LNKTYPE, "./train/circle/001.png"
        tf.addfile(info)
    with pytest.raises(DataError, match="is a link inside the archive"):
        load_data(f"imagefolder:{linked}", image_size=16)
    monkeypatch.setattr(imf, "MAX_MEMBER_BYTES", 100)  # every image is "too big" now
    for src in (good, folder):
        with pytest.raises(DataError, match="MiB an image may have|inflates to"):
            load_imagefolder(src, image_size=16, cache=False)


def test_big_images_are_refused_before_decoding(tmp_path, monkeypatch, folder):
    import forgetrt.train.imagefolder as imf

    monkeypatch.setattr(imf, "MAX_PIXELS", 4000)  # the generated images are 64x64 and up (PIL refuses at 2x)
    with pytest.raises(DataError, match="over 4,000 pixels: refused before decoding"):
        load_imagefolder(folder, image_size=16, cache=False, workers=1)


def test_layouts_torchvision_users_expect(tmp_path):
    base = make_imagefolder(tmp_path / "base", n_train=3, n_test=2, size=(20, 20), vary=False)
    # images in sub-folders of a class belong to it; a class folder may be a symbolic link
    nested = base / "train" / "circle" / "2019"
    nested.mkdir()
    (nested / "deep.png").write_bytes((base / "train" / "circle" / "001.png").read_bytes())
    (tmp_path / "elsewhere").mkdir()
    (base / "train" / "square").rename(tmp_path / "elsewhere" / "square")
    (base / "train" / "square").symlink_to(tmp_path / "elsewhere" / "square", target_is_directory=True)
    ds = load_data(f"imagefolder:{base}", cache=False)
    assert ds.classes == CLASSES and np.bincount(ds.y_train).tolist() == [4, 3, 3]
    # a non-UTF-8 file name loads (and hashes for the cache)
    odd = base / "train" / "stripes" / os.fsdecode(b"caf\xe9.png")
    odd.write_bytes((base / "train" / "stripes" / "001.png").read_bytes())
    assert np.bincount(load_data(f"imagefolder:{base}").y_train).tolist() == [4, 3, 4]


def test_split_file_edges(tmp_path):
    flat = tmp_path / "flat"
    src = make_imagefolder(tmp_path / "src", n_train=2, n_test=1, size=(16, 16), vary=False)
    lines = []
    for split in ("train", "test"):
        for p in sorted((src / split).rglob("*.*")):
            dst = flat / p.parent.name / "sub" / f"{split}-{p.name}"  # nested: the class is the first folder
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(p.read_bytes())
            lines.append(f"{dst.relative_to(flat).as_posix()},{split}")
    (flat / "splits.csv").write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")  # with a BOM
    ds = load_data(f"imagefolder:{flat}")
    assert ds.classes == CLASSES and len(ds.y_train) == 6 and len(ds.y_test) == 3  # the first row kept
    (flat / "splits.csv").write_text("\n".join([*lines, lines[0].replace(",train", ",test")]) + "\n")
    with pytest.raises(DataError, match="is listed as train and as test"):
        load_data(f"imagefolder:{flat}")
    (flat / "splits.csv").write_text("\n".join([*lines, "circle/nope.png,train"]) + "\n")
    with pytest.raises(DataError, match=r"lists 1 file\(s\) that are not there.*nope.png"):
        load_data(f"imagefolder:{flat}")


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    root = make_imagefolder(tmp_path / "g", n_train=1, n_test=1, size=(8, 8), vary=False)
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1024).astype(np.uint16)  # 0 .. 64512
    for p in (root / "train" / "circle").iterdir():
        p.unlink()
    Image.fromarray(ramp).save(root / "train" / "circle" / "000.png")
    ds = load_data(f"imagefolder:{root}", cache=False)
    i = int(np.flatnonzero(ds.y_train == 0)[0])
    got = ds.x_train[i, 0].astype(int)
    np.testing.assert_allclose(got, np.round(ramp / 257.0), atol=1)
    assert got.max() == 251 and got.min() == 0


def test_cache_sees_a_rewrite_that_keeps_size_and_mtime(tmp_path):
    root = make_imagefolder(tmp_path / "c", n_train=1, n_test=1, size=(8, 8), vary=False)
    p = root / "train" / "circle" / "000.jpg"
    p.unlink()
    p = p.with_suffix(".bmp")
    Image.new("RGB", (8, 8), (255, 0, 0)).save(p)
    a = load_data(f"imagefolder:{root}")
    st = p.stat()
    Image.new("RGB", (8, 8), (0, 255, 0)).save(p)  # same size in bytes
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    b = load_data(f"imagefolder:{root}")
    i = int(np.flatnonzero(a.y_train == 0)[0])
    assert a.x_train[i, :, 0, 0].tolist() == [255, 0, 0] and b.x_train[i, :, 0, 0].tolist() == [0, 255, 0]


def test_environment_problems_are_typed(tmp_path, folder, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("FORGETRT_CACHE_DIR", str(blocker / "cache"))
    with pytest.raises(DataError, match="cannot use the data cache.*FORGETRT_CACHE_DIR"):
        load_data(f"imagefolder:{folder}", image_size=16)
    for bad in ("inf", "1e400", "nan"):
        with pytest.raises(InvalidInputError, match="finite"):
            parse_memory(bad)


def test_boolean_rows_select_like_numpy(folder, monkeypatch):
    import torch

    from forgetrt.train.loops import DeviceData

    monkeypatch.setenv("FORGETRT_DATA_MEMORY_CAP", "1k")
    ds = load_data(f"imagefolder:{folder}", image_size=8)
    mask = np.zeros(len(ds.y_train), bool)
    mask[[1, 4, 7]] = True
    for x in (ds.x_train, np.asarray(ds.x_train)):
        d = DeviceData(x, ds.y_train, ds.scale, torch.device("cpu"), rows=mask)
        assert len(d) == 3 and torch.equal(
            d.images(slice(0, 3)),
            DeviceData(np.asarray(ds.x_train)[[1, 4, 7]], ds.y_train[[1, 4, 7]], ds.scale, torch.device("cpu")).images(
                slice(0, 3)
            ),
        )


def test_model_labels_must_name_the_data_classes(tmp_path, folder):
    import torch
    from safetensors.torch import save_file

    from forgetrt.runtime.architectures import create_body
    from forgetrt.train import workflows as wf
    from forgetrt.train.data import ForgetSpec

    torch.manual_seed(0)
    w = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in create_body("cifar-small", 3).state_dict().items()}, str(w))
    m = tmp_path / "m"
    wf.import_model("cifar-small", w, m, labels=["square", "circle", "stripes"], image_size=32)
    with pytest.raises(InvalidInputError, match="class 0 is 'square', the data's is 'circle'"):
        wf.train_vector(m, f"imagefolder:{folder}", tmp_path / "b", {"v": ForgetSpec(classes=(0,))}, device="cpu")
