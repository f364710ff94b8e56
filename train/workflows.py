"""The library functions behind each CLI command: load artifacts, run the work, write artifacts.

Each takes plain values (paths, specs, recipes) and returns a JSON-ready dict, so a few lines of
Python reproduce anything the CLI does::

    from forgetrt.train import workflows as wf
    wf.train_model("digits-cnn", "digits", "runs/model")
    wf.train_class_vectors("runs/model", "digits", "runs/bank", classes=None, recipe=PRESETS["digits"])
    wf.evaluate_result("runs/model", "digits", bank_dir="runs/bank", vector="forget-3")
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from forgetrt.runtime.architectures import model_input_shape
from forgetrt.runtime.bank import VectorBank
from forgetrt.runtime.errors import InvalidInputError, unknown
from forgetrt.runtime.files import ensure_writable_dir, read_json
from forgetrt.runtime.model_folder import ModelManifest, load_model, read_model_manifest, save_model

from .baselines import run_baseline
from .calibrate import calibrate_vector, calibration_mode
from .data import Dataset, ForgetSpec, ForgetSplit, ValidationSplit, load_data
from .loops import accuracy, iospec_for, predict_logits, resolve_device, train_classifier
from .metrics import avg_gap, evaluate
from .recipes import COMPOSE_METHODS, TrainConfig, VectorRecipe, default_baseline_config, default_train_config
from .vectors import learn_composition, train_vectors

log = logging.getLogger("forgetrt.train")

__all__ = [
    "train_model",
    "import_model",
    "train_vector",
    "train_class_vectors",
    "compose_fixed",
    "compose_learned",
    "evaluate_result",
    "unlearn_baseline",
    "held_out_indices",
    "as_dataset",
]


def as_dataset(data: str | Dataset, iospec: Any = None) -> Dataset:
    """``data`` itself, or the spec loaded (an ImageFolder resized to ``iospec``'s input size, if given)."""
    if isinstance(data, Dataset):
        return data
    return load_data(data, image_size=None if iospec is None else tuple(iospec.shape[1:]))


def _data_spec(data: str | Dataset) -> str:
    return data if isinstance(data, str) else data.name


def _check_data(info: ModelManifest, ds: Dataset) -> None:
    if tuple(info.iospec.shape) != ds.shape or info.iospec.num_classes != ds.num_classes:
        raise InvalidInputError(
            f"model {info.path} takes {info.iospec.shape} with {info.iospec.num_classes} classes, "
            f"data {ds.name} has {ds.shape} with {ds.num_classes} classes"
        )
    if tuple(info.iospec.labels) != tuple(ds.classes):  # same count, other names or order: labels would lie
        diff = next(i for i, (a, b) in enumerate(zip(info.iospec.labels, ds.classes)) if a != b)
        raise InvalidInputError(
            f"model {info.path}'s class {diff} is {info.iospec.labels[diff]!r}, the data's is {ds.classes[diff]!r}: "
            f"the model's labels {list(info.iospec.labels)[:10]} must name the data's classes in order"
        )


def _accuracies(model: torch.nn.Module, ds: Dataset, held_out: np.ndarray | None = None) -> dict[str, float]:
    """Accuracy on the training images the model trained on, on its held-out split (if any), on test."""
    keep = np.ones(len(ds.y_train), bool)
    out: dict[str, float] = {}
    if held_out is not None and len(held_out):
        keep[held_out] = False
        out["val_acc"] = accuracy(predict_logits(model, ds.x_train, ds.scale, rows=held_out), ds.y_train[held_out])
    kept = np.flatnonzero(keep)
    out["train_acc"] = accuracy(predict_logits(model, ds.x_train, ds.scale, rows=kept), ds.y_train[kept])
    out["test_acc"] = accuracy(predict_logits(model, ds.x_test, ds.scale), ds.y_test)
    return out


def held_out_indices(model_dir: str | os.PathLike, data: str | Dataset) -> np.ndarray | None:
    """The training indices the classifier in ``model_dir`` held out of its training, or None."""
    info = read_model_manifest(model_dir)
    return _held_out(info, as_dataset(data, info.iospec))


def _held_out(info: ModelManifest, ds: Dataset) -> np.ndarray | None:
    """The training indices the classifier held out (checked against the data), or None."""
    if not info.validation:
        return None
    return ValidationSplit.from_description(info.validation, ds).indices(ds)


def _validation(info: ModelManifest, ds: Dataset, recipe: VectorRecipe, held_out: np.ndarray | None):
    """The split vector tuning validates on: the model's held-out images when it has them (data it never
    saw), else ``recipe.val_fraction`` carved from the training set (data it saw). Returns the indices,
    whether they are held out, and the record for the bank manifest."""
    if held_out is not None:
        return held_out, True, {"source": "model", **info.validation}
    vs = ValidationSplit(recipe.val_fraction, recipe.seed)
    return vs.indices(ds), False, {"source": "carved", **vs.describe(ds)}


# --------------------------------------------------------------------------- classifier


def train_model(
    arch: str,
    data: str | Dataset,
    out: str | os.PathLike,
    *,
    epochs: int | None = None,
    seed: int = 0,
    device: str = "auto",
    batch_size: int | None = None,
    lr: float | None = None,
    val_fraction: float | None = 0.1,
    image_size: int | None = None,
    init_weights: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Train a classifier and write ``model.safetensors`` + ``model.json`` into ``out``.

    ``arch`` is one of the project's architectures or ``torchvision:NAME`` / ``timm:NAME``; for those,
    ``image_size`` sets the input size an ImageFolder is resized to (default: the images' own size), and
    ``init_weights`` (a safetensors state dict of the architecture, e.g. ImageNet weights saved locally)
    starts a fine-tune: tensors that do not fit the data's classes (the head) start fresh.
    ``val_fraction`` of the training set (stratified, seeded by ``seed``) is held out of training and
    recorded in the manifest: vector tuning later validates on it as data the model never saw. ``None``
    or 0 trains on everything.
    """
    fixed = model_input_shape(arch)  # unknown arch fails before the data is loaded
    ensure_writable_dir(out, "model folder")  # before training, not after
    init_state, init_record = (None, None) if init_weights is None else _read_weights(init_weights)
    split = ValidationSplit(val_fraction, seed) if val_fraction else None
    if isinstance(data, Dataset):
        ds = data
    else:
        ds = load_data(data, image_size=image_size if image_size is not None or fixed is None else fixed[1:])
    dev = resolve_device(device)
    cfg = default_train_config(arch, epochs, seed=seed, batch_size=batch_size, lr=lr)
    held_out = split.indices(ds) if split else None
    train_idx = None if held_out is None else np.setdiff1d(np.arange(len(ds.y_train)), held_out)
    model, spec, stats = train_classifier(arch, ds, cfg, dev, train_idx=train_idx, init_state=init_state)
    if init_record is not None:
        init_record["reinitialized"] = stats.get("reinitialized", [])
    manifest = save_model(
        out,
        model,
        arch=arch,
        iospec=spec,
        data=_data_spec(data),
        metrics=_accuracies(model, ds, held_out),
        training={
            **cfg.to_dict(),
            "device": str(dev),
            "seconds": stats["seconds"],
            **({"init_weights": init_record} if init_record else {}),
        },
        validation=split.describe(ds) if split else None,
    )
    return manifest.to_dict()


def _read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A local safetensors state dict and its record (file name, sha256). No pickle, no download."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from forgetrt.runtime.errors import ArtifactError, CorruptArtifactError
    from forgetrt.runtime.files import sha256_file

    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"weights file not found: {p}")
    try:
        state = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise CorruptArtifactError(
            f"cannot read weights {p} as safetensors ({e}); convert a torch checkpoint with "
            "safetensors.torch.save_file(model.state_dict(), PATH)"
        ) from e
    return state, {"file": p.name, "sha256": sha256_file(p)}


def import_model(
    arch: str | None,
    weights: str | os.PathLike | None,
    out: str | os.PathLike,
    *,
    labels: Sequence[str],
    image_size: int | tuple[int, int],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    data: str | None = None,
    program: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Make a model folder from a classifier trained elsewhere: ``arch`` (``torchvision:NAME``,
    ``timm:NAME`` or one of ours) with a local safetensors file of its state dict, or a ``program`` saved
    with ``torch.export.save`` (exported in eval mode with a dynamic batch dimension; no Python code of
    the model needed), and the input contract declared once (size, labels, and the mean/std it
    normalizes [0, 1] pixels with; none when the model takes [0, 1] pixels as they are). The folder then
    works with every command (train-vector, compose, eval, export, serve) and binds banks to its weights'
    fingerprint like a model trained here. With ``data``, test accuracy is measured and recorded."""
    from forgetrt.runtime.architectures import TORCH_EXPORT, create_model, program_model
    from forgetrt.runtime.iospec import IOSpec

    from .loops import load_body_weights

    if (program is None) == (arch is None or weights is None):
        raise InvalidInputError("give an architecture and its weights, or a torch.export program (not both)")
    arch = TORCH_EXPORT if program is not None else arch
    assert arch is not None
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(int(v) for v in image_size)
    fixed = model_input_shape(arch)
    channels = fixed[0] if fixed else 3
    if (mean is None) != (std is None):
        raise InvalidInputError("give both --mean and --std, or neither (the model takes [0, 1] pixels as they are)")
    spec = IOSpec(
        shape=(channels, *hw),  # type: ignore[arg-type]
        mean=tuple(float(v) for v in mean) if mean is not None else (0.0,) * channels,
        std=tuple(float(v) for v in std) if std is not None else (1.0,) * channels,
        labels=tuple(str(v) for v in labels),
    )
    ensure_writable_dir(out, "model folder")
    program_bytes = None
    if program is not None:
        from forgetrt.runtime.errors import ArtifactError
        from forgetrt.runtime.files import sha256_file

        if not Path(program).is_file():
            raise ArtifactError(f"torch.export program not found: {program}")
        program_bytes = Path(program).read_bytes()
        model = program_model(program_bytes, spec)
        record = {"file": Path(program).name, "sha256": sha256_file(program), "format": "torch.export"}
    else:
        assert weights is not None
        state, record = _read_weights(weights)
        model = create_model(arch, spec)
        load_body_weights(model, state, strict=True)
    model.eval()
    try:
        with torch.no_grad():
            y = model(torch.zeros(3, *spec.shape))[:1]  # a batch of 3: the batch dimension must be dynamic
    except Exception as e:  # an exported program raises its own guard errors for other shapes
        if program is None:
            raise InvalidInputError(
                f"{arch} does not run on images of {spec.shape[1]}x{spec.shape[2]}: {type(e).__name__}: {str(e)[:200]}"
            ) from e
        raise InvalidInputError(
            f"the program does not run on a batch of 3 images of {spec.shape}: export it with a dynamic batch "
            "dimension (dynamic_shapes={'x': {0: torch.export.Dim('batch')}}) at this input size "
            f"({type(e).__name__}: {str(e)[:200]})"
        ) from e
    if tuple(y.shape) != (1, spec.num_classes):
        raise InvalidInputError(
            f"{arch} returns {tuple(y.shape)} for one image, not (1, {spec.num_classes}) logits for the "
            f"{spec.num_classes} labels declared"
        )
    if not torch.isfinite(y).all():
        raise InvalidInputError(f"{arch} with these weights returns non-finite logits for a blank image")
    metrics: dict[str, Any] = {}
    if data is not None:
        ds = as_dataset(data, spec)
        _check_data(ModelManifest(arch, spec, "", path=Path(out)), ds)
        if ds.classes != spec.labels:
            raise InvalidInputError(f"data classes {list(ds.classes)} differ from the labels {list(spec.labels)}")
        metrics["test_acc"] = accuracy(predict_logits(model, ds.x_test, ds.scale), ds.y_test)
    manifest = save_model(
        out,
        model,
        arch=arch,
        iospec=spec,
        data=data,
        metrics=metrics,
        training={"imported": record},
        program=program_bytes,
    )
    return manifest.to_dict()


# --------------------------------------------------------------------------- vectors


def _open_bank(bank_dir: str | os.PathLike, info: ModelManifest) -> VectorBank:
    if VectorBank.exists(bank_dir):
        bank = VectorBank.load(bank_dir)
        bank.check_model(info.fingerprint, info.iospec, what=f"model {info.path}")
        return bank
    bank = VectorBank.create(info.fingerprint, info.arch, info.iospec)
    bank.path = Path(bank_dir)
    return bank


def train_vector(
    model_dir: str | os.PathLike,
    data: str | Dataset,
    bank_dir: str | os.PathLike,
    specs: Mapping[str, ForgetSpec],
    recipe: VectorRecipe = VectorRecipe(),
    *,
    device: str = "auto",
    evaluate_after: bool = True,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Train one vector per named spec (batched) and add them to the bank (created if absent)."""
    dev = resolve_device(device)
    model, info = load_model(model_dir, dev)
    bank = _open_bank(bank_dir, info)
    clash = [n for n in specs if n in bank and not overwrite]
    if not clash:
        ensure_writable_dir(bank_dir, "bank folder")
    if clash:
        raise InvalidInputError(f"vectors {clash} already exist in {bank_dir}; pass --overwrite to replace them")
    ds = as_dataset(data, info.iospec)
    _check_data(info, ds)
    held_out = _held_out(info, ds)
    val_idx, val_is_held_out, val_record = _validation(info, ds, recipe, held_out)
    for spec in specs.values():  # a calibration that does not fit a spec is refused before any training
        calibration_mode(recipe, spec.resolve(ds, held_out))
    t0 = time.perf_counter()
    trained = train_vectors(
        model, ds, specs, recipe, device=dev, held_out=held_out, exclude=None if val_is_held_out else val_idx
    )
    results = []
    for tv in trained:
        split = tv.spec.resolve(ds, held_out)
        t1 = time.perf_counter()
        cal = calibrate_vector(model, ds, split, tv.vector, recipe, val_idx=val_idx, val_held_out=val_is_held_out)
        vector = (np.float32(cal.strength) * tv.vector).astype(np.float32)
        cal_s = time.perf_counter() - t1
        seconds = tv.seconds + cal_s  # training share plus this vector's calibration
        metrics = evaluate(model, ds, split, vector) if evaluate_after else None
        if metrics is not None:
            metrics["seconds"] = seconds
        times = {"seconds": seconds, "train_seconds": tv.seconds, "calibrate_seconds": cal_s}
        record = {**recipe.to_dict(), "data": _data_spec(data), "device": str(dev), **times}
        record.update(val_fraction=val_record["fraction"], validation=val_record, calibration=cal.to_dict())
        bank.add(tv.name, vector, forgets=tv.spec.describe(ds), recipe=record, metrics=metrics, overwrite=overwrite)
        results.append(
            {
                "name": tv.name,
                "forgets": tv.spec.describe(ds),
                **times,
                "strength": cal.strength,
                "calibration": cal.to_dict(),
                "metrics": metrics,
            }
        )
    log.info("trained %d vector(s) in %.1fs", len(trained), time.perf_counter() - t0)
    bank.save(bank_dir)
    return results


def train_class_vectors(
    model_dir: str | os.PathLike,
    data: str | Dataset,
    bank_dir: str | os.PathLike,
    *,
    classes: Sequence[int | str] | None = None,
    recipe: VectorRecipe = VectorRecipe(),
    device: str = "auto",
    evaluate_after: bool = True,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """One class-wise vector per class (all classes by default), named ``forget-<class>``."""
    ds = as_dataset(data, read_model_manifest(model_dir).iospec)
    idx = range(ds.num_classes) if classes is None else [ds.class_index(c) for c in classes]
    specs = {f"forget-{i}": ForgetSpec(classes=(i,)) for i in idx}
    return train_vector(
        model_dir, ds, bank_dir, specs, recipe, device=device, evaluate_after=evaluate_after, overwrite=overwrite
    )


def compose_fixed(
    bank_dir: str | os.PathLike, name: str, weights: Mapping[str, float], *, overwrite: bool = False
) -> dict[str, Any]:
    """Save ``sum_i w_i * delta_i`` as a new vector; its entry records the coefficients."""
    if not weights:
        raise InvalidInputError("compose needs at least one name=weight pair")
    bank = VectorBank.load(bank_dir)
    vec = bank.combine(weights)
    forgets = _union_forgets(bank, weights)
    bank.add(name, vec, forgets=forgets, recipe={"method": "fixed"}, composition=weights, overwrite=overwrite)
    bank.save()
    return {"name": name, "composition": dict(weights), "forgets": forgets, "norm_l2": float(np.linalg.norm(vec))}


def _union_forgets(bank: VectorBank, names: Sequence[str] | Mapping[str, float]) -> dict[str, Any]:
    """A composition of class-wise vectors (positive weights) forgets the union of their classes."""
    items = names.items() if isinstance(names, Mapping) else ((n, 1.0) for n in names)
    classes: set[int] = set()
    for n, w in items:
        f = bank.entry(n).forgets
        if f.get("kind") != "class":
            return {"kind": "composition"}
        if float(w) > 0:
            classes.update(int(c) for c in f["classes"])
    if not classes:
        return {"kind": "composition"}
    labels = [bank.iospec.labels[c] for c in sorted(classes)]
    return {"kind": "class", "classes": sorted(classes), "labels": labels}


def compose_learned(
    bank_dir: str | os.PathLike,
    name: str,
    model_dir: str | os.PathLike,
    data: str | Dataset,
    target: ForgetSpec,
    recipe: VectorRecipe = VectorRecipe(),
    *,
    basis: Sequence[str] | None = None,
    device: str = "auto",
    evaluate_after: bool = True,
    overwrite: bool = False,
    init: str = "forgets",
    method: str = "learn",
) -> dict[str, Any]:
    """A new vector for ``target`` from existing ones (``basis``: every non-composed vector by default).

    ``method="learn"`` trains only the coefficients over the basis (forget-vector arithmetic; the entry
    records them as its composition). ``init="forgets"`` starts from the arithmetic's own guess: coefficient
    1 for every class-wise basis vector whose classes the target forgets, 0 for the others (all 0 for a
    target that is not class-wise); ``"zero"`` starts from 0.

    ``method="refine"`` starts from the guess's vector (the sum of the target classes' vectors) and trains
    the whole vector with ``recipe``: far less damage than coefficients alone where class vectors interfere
    (benchmarks/RESULTS.md), at the same budget, but the result is a vector of its own, not a combination
    (its entry records the guess it started from). It needs a class-wise target whose classes have vectors.

    Either way :func:`~forgetrt.train.recipes.composition_recipe` gives the budget the benchmarks use (a
    tenth of a direct vector's training steps).
    """
    if init not in ("forgets", "zero"):
        raise unknown("composition init", init, ("forgets", "zero"))
    if method not in COMPOSE_METHODS:
        raise unknown("composition method", method, COMPOSE_METHODS)
    if method == "refine" and init != "forgets":
        raise InvalidInputError(
            "refine starts from the arithmetic's guess (init 'forgets'); from zero it would be a direct vector"
        )
    dev = resolve_device(device)
    model, info = load_model(model_dir, dev)
    bank = VectorBank.load(bank_dir)
    bank.check_model(info.fingerprint, info.iospec, what=f"model {info.path}")
    if name in bank and not overwrite:
        raise InvalidInputError(f"vector {name!r} already exists in {bank_dir}; pass --overwrite to replace it")
    names = list(basis) if basis else [n for n in bank.names if not bank.entry(n).composed]
    if not names:
        raise InvalidInputError(f"bank {bank_dir} has no vector to compose from")
    vectors = {n: bank.get(n) for n in names}
    ds = as_dataset(data, info.iospec)
    _check_data(info, ds)
    held_out = _held_out(info, ds)
    val_idx, val_is_held_out, val_record = _validation(info, ds, recipe, held_out)
    exclude = None if val_is_held_out else val_idx
    split = target.resolve(ds, held_out)
    calibration_mode(recipe, split)  # refused before training if it does not fit the target
    start = _arithmetic_guess(bank, names, target, ds) if init == "forgets" else None
    if method == "refine":
        if not start:
            raise InvalidInputError(
                f"refine starts from the target classes' own vectors and {bank_dir} has none among "
                f"{names} for {target.describe(ds)}: train a direct vector instead (train-vector)"
            )
        guess = np.sum([w * vectors[k] for k, w in start.items()], axis=0, dtype=np.float32)
        (tv,) = train_vectors(
            model, ds, {name: target}, recipe, device=dev, held_out=held_out, exclude=exclude, init={name: guess}
        )
    else:
        tv = learn_composition(
            model, ds, target, vectors, recipe, name=name, device=dev, held_out=held_out, exclude=exclude, init=start
        )
    t1 = time.perf_counter()
    cal = calibrate_vector(model, ds, split, tv.vector, recipe, val_idx=val_idx, val_held_out=val_is_held_out)
    cal_s = time.perf_counter() - t1
    seconds = tv.seconds + cal_s
    times = {"seconds": seconds, "train_seconds": tv.seconds, "calibrate_seconds": cal_s}
    vector = (np.float32(cal.strength) * tv.vector).astype(np.float32)
    coefficients = None if tv.coefficients is None else {k: cal.strength * c for k, c in tv.coefficients.items()}
    metrics = evaluate(model, ds, split, vector) if evaluate_after else None
    if metrics is not None:
        metrics["seconds"] = seconds
        metrics.update(_per_class_ua(model, ds, split, vector))
    record = {
        "method": "learned" if method == "learn" else "refined",
        **recipe.to_dict(),
        "data": _data_spec(data),
        **times,
    }
    record.update(
        parameters=len(names) if method == "learn" else int(np.prod(ds.shape)),
        init=init if method == "learn" else {"sum": start},
        val_fraction=val_record["fraction"],
        validation=val_record,
        calibration=cal.to_dict(),
    )
    bank.add(
        name,
        vector,
        forgets=target.describe(ds),
        recipe=record,
        metrics=metrics,
        composition=coefficients,
        overwrite=overwrite,
    )
    bank.save()
    return {
        "name": name,
        "method": method,
        "coefficients": coefficients,
        "forgets": target.describe(ds),
        **times,
        "strength": cal.strength,
        "metrics": metrics,
    }


def _arithmetic_guess(bank: VectorBank, names: Sequence[str], target: ForgetSpec, ds: Dataset) -> dict[str, float]:
    """Coefficient 1 for class-wise vectors that together forget the target's classes, each class counted once:
    vectors with fewer classes first (so ``forget-0`` and ``forget-3`` rather than a 0+3 vector beside them),
    in bank order, a vector taken only if none of its classes is covered yet."""
    if target.classes is None:
        return {}
    wanted = {ds.class_index(c) for c in target.classes}
    candidates = []
    for n in names:
        f = bank.entry(n).forgets
        if f.get("kind") == "class" and set(f["classes"]) <= wanted:
            candidates.append((len(f["classes"]), n, set(f["classes"])))
    guess: dict[str, float] = {}
    covered: set[int] = set()
    for _, n, classes in sorted(candidates, key=lambda c: c[0]):  # stable: bank order within a size
        if not classes & covered:
            guess[n] = 1.0
            covered |= classes
    return guess


def _per_class_ua(model, ds: Dataset, split: ForgetSplit, vector: np.ndarray | None) -> dict[str, Any]:
    if not split.classes or len(split.classes) < 2:
        return {}
    logits = predict_logits(model, ds.x_train, ds.scale, vector, rows=split.forget)
    y = ds.y_train[split.forget]
    return {"UA_per_class": {ds.classes[c]: 100.0 - accuracy(logits[y == c], y[y == c]) for c in split.classes}}


# --------------------------------------------------------------------------- evaluation


def evaluate_result(
    model_dir: str | os.PathLike,
    data: str | Dataset,
    *,
    bank_dir: str | os.PathLike | None = None,
    vector: str | None = None,
    weights: Mapping[str, float] | None = None,
    forget: ForgetSpec | None = None,
    indices_file: str | os.PathLike | None = None,
    reference: str | os.PathLike | Mapping[str, Any] | None = None,
    device: str = "auto",
    mia_max_per_side: int | None = None,
    mask_forgotten: bool = False,
) -> dict[str, Any]:
    """UA/RA/TA/MIA (and Avg.Gap against ``reference``) of a model, with a bank vector or composition
    (and, with ``mask_forgotten``, the forgotten classes masked at the output).

    The forget set comes from ``forget`` if given, else from what the vector (or, for an unlearned
    baseline model, the model record) says it forgets.
    """
    if vector is not None and weights is not None:
        raise InvalidInputError("give either a vector name or weights, not both")
    if (vector is not None or weights is not None) and bank_dir is None:
        raise InvalidInputError("a vector or weights need --bank")
    dev = resolve_device(device)
    model, info = load_model(model_dir, dev)
    delta = None
    recorded: dict[str, Any] | None = (info.unlearning or {}).get("forgets")
    what = "model"
    if bank_dir is not None and (vector is not None or weights is not None):
        bank = VectorBank.load(bank_dir)
        bank.check_model(info.fingerprint, info.iospec, what=f"model {info.path}")
        if vector is not None:
            delta = bank.get(vector)
            recorded = bank.entry(vector).forgets
            what = vector
        else:
            assert weights is not None
            delta = bank.combine(weights)
            recorded = _union_forgets(bank, weights)
            what = ",".join(f"{k}={v:g}" for k, v in weights.items())
    if forget is None:
        if not recorded or recorded.get("kind") not in ("class", "fraction", "indices"):
            raise InvalidInputError(
                "cannot tell what was forgotten: pass --forget-classes, --forget-fraction or --forget-indices"
            )
        forget = ForgetSpec.from_description(recorded, indices_file)
    ds = as_dataset(data, info.iospec)
    _check_data(info, ds)
    split = forget.resolve(ds, _held_out(info, ds))
    result = evaluate(model, ds, split, delta, mia_max_per_side=mia_max_per_side, mask_forgotten=mask_forgotten)
    result.update(_per_class_ua(model, ds, split, delta))
    result["evaluated"] = what + (" + output mask" if mask_forgotten else "")
    result["forgets"] = forget.describe(ds)
    result["model_fingerprint"] = info.fingerprint
    if reference is not None:
        ref = reference if isinstance(reference, Mapping) else read_json(reference, "reference result")
        result["avg_gap"] = avg_gap(result, ref)
    return result


# --------------------------------------------------------------------------- baselines


def unlearn_baseline(
    method: str,
    model_dir: str | os.PathLike,
    data: str | Dataset,
    forget: ForgetSpec,
    out: str | os.PathLike,
    *,
    epochs: int | None = None,
    lr: float | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Run a model-based unlearning baseline and save the unlearned copy as a model folder."""
    from forgetrt.runtime.architectures import TORCH_EXPORT

    if read_model_manifest(model_dir).arch == TORCH_EXPORT:
        raise InvalidInputError(
            "model-based baselines retrain or fine-tune the weights, and a torch.export program is a frozen graph: "
            "import the model by architecture and weights (--arch, --weights) to run them"
        )
    dev = resolve_device(device)
    model, info = load_model(model_dir, dev)
    ensure_writable_dir(out, "model folder")
    ds = as_dataset(data, info.iospec)
    _check_data(info, ds)
    held_out = _held_out(info, ds)
    split = forget.resolve(ds, held_out)  # Retrain trains on split.retain: the held-out images stay out
    try:
        original_cfg = TrainConfig(**{k: v for k, v in info.training.items() if k in TrainConfig.__dataclass_fields__})
    except TypeError:
        original_cfg = default_train_config(info.arch)
    cfg = default_baseline_config(method, original_cfg, epochs, lr)
    unlearned, seconds = run_baseline(cfg, info.arch, model, ds, split, dev)
    # Retrain is a new classifier: its normalization constants come from the retain images it trained on
    iospec = iospec_for(ds, split.retain) if method == "retrain" else info.iospec
    return save_model(
        out,
        unlearned,
        arch=info.arch,
        iospec=iospec,
        data=_data_spec(data),
        metrics=_accuracies(unlearned, ds, held_out),
        training=cfg.train.to_dict(),
        validation=info.validation,
        unlearning={
            "method": method,
            "forgets": forget.describe(ds),
            "source_fingerprint": info.fingerprint,
            "seconds": seconds,
        },
    ).to_dict()
