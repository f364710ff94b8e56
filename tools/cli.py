"""The ``forgetrt`` command line: a thin layer over the library.

Each command parses its options, calls one library function, and prints. Library errors
(:class:`forgetrt.runtime.errors.ForgetRTError`) become a one-line message and an exit code at one
boundary (:class:`_Group`), never a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from forgetrt import __version__
from forgetrt.export.tensorrt import TrtBuildConfig
from forgetrt.export.triton import TRITON_BACKENDS
from forgetrt.runtime.backends import DEVICES, backend_names, list_backends
from forgetrt.runtime.batcher import BatchingConfig
from forgetrt.runtime.bench import MIXES, BenchConfig
from forgetrt.runtime.control import TOKEN_ENV
from forgetrt.runtime.deploy import ClusterConfig, ScaleConfig
from forgetrt.runtime.errors import ForgetRTError, InvalidInputError
from forgetrt.runtime.guards import DEFAULT_CANCEL_THRESHOLD
from forgetrt.runtime.limits import ServerLimits
from forgetrt.runtime.logs import LOG_FORMATS, LOG_LEVELS, configure_logging
from forgetrt.runtime.runtime import PIXEL_POLICIES
from forgetrt.train.data import DATA_KINDS, ForgetSpec
from forgetrt.train.recipes import BASELINES, PRESETS, VectorRecipe

__all__ = ["cli", "main"]


# which install extra brings each optional top-level module a command may import
EXTRAS = {
    "torch": "train",
    "torchvision": "vision",
    "timm": "vision",
    "sklearn": "train",
    "matplotlib": "train",
    "onnxruntime": "cpu",
    "tensorrt": "trt",
    "model_signing": "sign",
    "OpenSSL": "sign",
    "ray": "ray",
    "grpc": "grpc",
    "tritonclient": "grpc",
}


def missing_extra_message(e: ModuleNotFoundError, command: str | None) -> str | None:
    """'forgetrt train-model needs the train extra: ...' for a module an extra provides, else None."""
    top = (e.name or "").split(".")[0]
    extra = EXTRAS.get(top)
    if extra is None:
        return None
    what = f"forgetrt {command}" if command else "this command"
    if extra == "cpu":
        return (
            f"{what} needs onnxruntime: pip install 'forgetrt[cpu]' (or 'forgetrt[gpu]' for the CUDA "
            "execution provider; never both)"
        )
    return f"{what} needs the '{extra}' extra ({top} is not installed): pip install 'forgetrt[{extra}]'"


class _Group(click.Group):
    """Maps every ForgetRTError raised by a subcommand to a clean ClickException with its exit code, and a
    missing optional dependency to the extra that installs it."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ForgetRTError as e:
            err = click.ClickException(str(e))
            err.exit_code = e.exit_code
            raise err from e
        except ModuleNotFoundError as e:
            msg = missing_extra_message(e, ctx.invoked_subcommand)
            if msg is None:
                raise
            err = click.ClickException(msg)
            err.exit_code = 4  # as BackendUnavailableError: something to install
            raise err from e


# --------------------------------------------------------------------------- parameter types


class CsvList(click.ParamType):
    """'0,3' -> [0, 3]; items that are not integers stay strings (class labels, vector names)."""

    name = "LIST"

    def convert(self, value: Any, param: Any, ctx: Any) -> list:
        if isinstance(value, list):
            return value
        items = [t.strip() for t in str(value).split(",") if t.strip()]
        if not items:
            self.fail(f"expected a comma-separated list, got {value!r}", param, ctx)
        return [int(t) if t.lstrip("-").isdigit() else t for t in items]


class Weights(click.ParamType):
    """'forget-0=1,forget-3=0.5' -> {'forget-0': 1.0, 'forget-3': 0.5}."""

    name = "NAME=W,..."

    def convert(self, value: Any, param: Any, ctx: Any) -> dict[str, float]:
        if isinstance(value, dict):
            return value
        out: dict[str, float] = {}
        for part in (p.strip() for p in str(value).split(",") if p.strip()):
            name, sep, w = part.partition("=")
            try:
                weight = float(w) if sep else 1.0
            except ValueError:
                self.fail(f"weight of {name!r} must be a number, got {w!r}", param, ctx)
            if not math.isfinite(weight):
                self.fail(f"weight of {name!r} must be finite, got {w!r}", param, ctx)
            if name in out:
                self.fail(f"vector {name!r} given twice", param, ctx)
            out[name.strip()] = weight
        if not out:
            self.fail("expected NAME=WEIGHT pairs separated by commas", param, ctx)
        return out


class DataSpec(click.ParamType):
    """'digits', 'cifar10:PATH' or 'imagefolder:PATH', checked at parse time."""

    name = "SPEC"

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        from forgetrt.train.data import parse_data_spec

        try:
            parse_data_spec(str(value))
        except ForgetRTError as e:
            self.fail(str(e), param, ctx)
        return str(value)


CSV = CsvList()
WEIGHTS = Weights()
DATA = DataSpec()
DEVICE = click.Choice(list(DEVICES))
BACKEND = click.Choice(["auto", *backend_names()])


def _device_option(default: str = "auto") -> Callable:
    return click.option("--device", type=DEVICE, default=default, show_default=True, help="Device.")


def _click_type(hint: Any, f: dataclasses.Field) -> Any:
    """The click type of a dataclass field: its ``choices`` metadata, else its (optional) type."""
    if "choices" in f.metadata:
        return click.Choice(list(f.metadata["choices"]))
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _dataclass_options(cls: type, *, skip: tuple[str, ...] = ()) -> list[tuple[dataclasses.Field, Callable]]:
    """A click option per field of ``cls`` with a ``help`` text (``batch_size`` -> ``--batch-size``),
    defaulting to None so only what the user sets reaches the library."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata or f.name in skip:
            continue
        flag = f.name.replace("_", "-")
        if hints[f.name] is bool:
            opt = click.option(f"--{flag}/--no-{flag}", f.name, default=None, help=f.metadata["help"])
        else:
            opt = click.option(
                f"--{flag}", f.name, type=_click_type(hints[f.name], f), default=None, help=f.metadata["help"]
            )
        out.append((f, opt))
    return out


def _apply(f: Callable, options: list[tuple[dataclasses.Field, Callable]]) -> Callable:
    for _, opt in reversed(options):
        f = opt(f)
    return f


# every backend's user options (TorchOptions.precision -> --precision, ...), each naming its backend
_BACKEND_OPTION_OWNERS: dict[str, list[str]] = {}
_BACKEND_OPTIONS: list[tuple[dataclasses.Field, Callable]] = []
for _entry in list_backends():
    for _f, _opt in _dataclass_options(_entry.options):
        if _f.name not in _BACKEND_OPTION_OWNERS:
            _BACKEND_OPTIONS.append((_f, _opt))
        _BACKEND_OPTION_OWNERS.setdefault(_f.name, []).append(_entry.name)


def _backend_options(f: Callable) -> Callable:
    """The backends' own options (from the registry); only those the user sets are passed on."""
    return _apply(f, _BACKEND_OPTIONS)


def _pop_backend_options(kw: dict[str, Any]) -> dict[str, Any]:
    """Take the backend options out of a command's keyword arguments: {field: value} for those set."""
    return {name: v for name in _BACKEND_OPTION_OWNERS if (v := kw.pop(name, None)) is not None}


def _forget_options(prefix: str = "forget") -> Callable:
    """--{prefix}-classes / --{prefix}-fraction / --{prefix}-indices: exactly one, which
    ForgetSpec.from_options checks."""

    def deco(f: Callable) -> Callable:
        f = click.option(
            f"--{prefix}-indices",
            type=click.Path(dir_okay=False),
            help="File of training indices to forget (text or JSON list).",
        )(f)
        f = click.option(
            f"--{prefix}-fraction", type=float, help="Forget this random fraction of the training set (with --seed)."
        )(f)
        f = click.option(f"--{prefix}-classes", type=CSV, help="Forget whole classes, e.g. 0,3 (indices or labels).")(f)
        return f

    return deco


_RECIPE_OPTIONS = _dataclass_options(VectorRecipe, skip=("seed",))


def _recipe_options(f: Callable) -> Callable:
    """--preset and one option per VectorRecipe field (the preset's value unless given)."""
    f = _apply(f, _RECIPE_OPTIONS)
    return click.option(
        "--preset",
        type=click.Choice(list(PRESETS)),
        default="paper",
        show_default=True,
        help="Base recipe; the options below override it.",
    )(f)


def _recipe(kw: dict[str, Any], seed: int, adapt: Callable[[VectorRecipe], VectorRecipe] | None = None) -> VectorRecipe:
    """The recipe the user asked for (popping its options from ``kw``); ``adapt`` turns the preset into the
    command's own defaults before the given options override it."""
    changes = {f.name: v for f, _ in _RECIPE_OPTIONS if (v := kw.pop(f.name, None)) is not None}
    if "epochs" in changes:  # --epochs N alone means N whole epochs, whatever share ``adapt`` chose
        changes.setdefault("epoch_share", 1.0)
    base = PRESETS[kw.pop("preset")]
    return dataclasses.replace(adapt(base) if adapt else base, seed=seed, **changes)


def _echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


# --------------------------------------------------------------------------- commands


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="forgetrt")
@click.option(
    "--log-level",
    type=click.Choice(list(LOG_LEVELS)),
    default="info",
    show_default=True,
    envvar="FORGETRT_LOG_LEVEL",
    show_envvar=True,
    help="Level of the log on stderr (the server's, uvicorn's and the library's).",
)
@click.option(
    "--log-format",
    type=click.Choice(list(LOG_FORMATS)),
    default="text",
    show_default=True,
    envvar="FORGETRT_LOG_FORMAT",
    show_envvar=True,
    help="'json': one JSON object per line, for log collectors. Progress bars are drawn only on a terminal.",
)
def cli(log_level: str, log_format: str) -> None:
    """ForgetRT: train forget vectors for a frozen classifier, compose them, evaluate unlearning.

    Typical flow: train-model -> train-vector (--each-class) -> compose -> eval. `forgetrt demo`
    runs all of it on sklearn's digits in about a minute.
    """
    configure_logging(log_level, log_format)


@cli.command("models")
def models_cmd() -> None:
    """List the classifier architectures: the project's own, and torchvision:NAME / timm:NAME (any input
    size; bring weights with `forgetrt import-model`, or train one with `train-model --arch`)."""
    from forgetrt.runtime.architectures import list_models, model_input_shape

    for name, desc in list_models().items():
        shape = model_input_shape(name)
        click.echo(f"{name:<18} input {'x'.join(map(str, shape)) if shape else 'any':<8} {desc}")


@cli.command("backends")
@click.argument("bundle_dir", required=False, type=click.Path(file_okay=False))
@click.option("--device", type=DEVICE, default="auto", show_default=True, help="Device to check a bundle on.")
def backends_cmd(bundle_dir: str | None, device: str) -> None:
    """List the registered backends: rank for `auto` per device, options, and, given BUNDLE, whether each
    can run it here (and why not)."""
    from forgetrt.runtime.backends import make_options, resolve_device

    bundle = dev = None
    if bundle_dir is not None:
        from forgetrt.runtime.bundle import Bundle

        bundle, dev = Bundle.load(bundle_dir), resolve_device(device)
    for e in list_backends():
        ranks = ", ".join(f"{d} {r}" for d, r in e.rank.items()) or "never auto"
        opts = ", ".join(f.name for f in dataclasses.fields(e.options)) or "none"
        click.echo(f"{e.name:<12} {e.description}")
        click.echo(f"{'':<12} auto rank: {ranks}; options: {opts}")
        if bundle is not None:
            why = e.available(bundle, dev, make_options(e.name))
            click.echo(f"{'':<12} on {dev}: {'available' if why is None else 'unavailable: ' + why}")


@cli.command("train-model")
@click.option("--arch", required=True, help="Architecture (see `forgetrt models`).")
@click.option(
    "--data", "data", type=DATA, default="digits", show_default=True, help=f"Data spec: {' | '.join(DATA_KINDS)}:PATH."
)
@click.option("--epochs", type=int, help="Epochs (default per arch).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Output model folder.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=int, help="Batch size (default per arch).")
@click.option("--lr", type=float, help="Peak learning rate (default per arch).")
@click.option(
    "--val-fraction",
    type=click.FloatRange(0.0, 1.0, max_open=True),
    default=0.1,
    show_default=True,
    help="Share of the training set held out of training (stratified, --seed) and recorded: vectors are tuned on "
    "it as data the model never saw. 0 trains on everything.",
)
@click.option(
    "--image-size",
    type=click.IntRange(1, 4096),
    help="Side (pixels) imagefolder images are resized and center-cropped to (default: their own size; the "
    "project's architectures fix theirs).",
)
@click.option(
    "--init-weights",
    type=click.Path(dir_okay=False),
    help="Start from this safetensors state dict of the architecture (fine-tuning); tensors that do not fit "
    "the data's classes, such as the head, start fresh.",
)
@_device_option()
def train_model_cmd(
    arch: str,
    data: str,
    epochs: int | None,
    out: str,
    seed: int,
    batch_size: int | None,
    lr: float | None,
    val_fraction: float,
    image_size: int | None,
    init_weights: str | None,
    device: str,
) -> None:
    """Train a classifier; writes OUT/model.safetensors and OUT/model.json. --arch is one of ours or any
    torchvision:NAME / timm:NAME (with --init-weights to fine-tune from a local weights file)."""
    from forgetrt.train.workflows import train_model

    rec = train_model(
        arch,
        data,
        out,
        epochs=epochs,
        seed=seed,
        device=device,
        batch_size=batch_size,
        lr=lr,
        val_fraction=val_fraction,
        image_size=image_size,
        init_weights=init_weights,
    )
    m = rec["metrics"]
    val = f"  held-out {m['val_acc']:.2f}%" if "val_acc" in m else ""
    click.echo(
        f"{arch}: train {m['train_acc']:.2f}%{val}  test {m['test_acc']:.2f}%  "
        f"({rec['training']['seconds']:.1f}s) -> {out}"
    )


@cli.command("import-model")
@click.option("--arch", help="torchvision:NAME, timm:NAME, or one of ours (`forgetrt models`); with --weights.")
@click.option(
    "--weights",
    type=click.Path(dir_okay=False),
    help="Local safetensors file of the classifier's state dict (nothing is downloaded).",
)
@click.option(
    "--program",
    type=click.Path(dir_okay=False),
    help="Instead of --arch/--weights: a torch.export program (.pt2, torch.export.save) exported in eval mode "
    "with a dynamic batch dimension.",
)
@click.option("--image-size", type=click.IntRange(1, 4096), required=True, help="Input side in pixels (H = W).")
@click.option(
    "--labels",
    required=True,
    help="Class labels in output order: comma-separated, or @FILE with one per line.",
)
@click.option(
    "--normalize",
    default="none",
    show_default=True,
    help="How the model normalizes [0, 1] pixels: 'imagenet', 'none' (it takes them as they are), or "
    "MEAN1,MEAN2,MEAN3/STD1,STD2,STD3.",
)
@click.option("--data", "data", type=DATA, help="Measure test accuracy on this data (imagefolder:PATH, ...).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Output model folder.")
def import_model_cmd(
    arch: str | None,
    weights: str | None,
    program: str | None,
    image_size: int,
    labels: str,
    normalize: str,
    data: str | None,
    out: str,
) -> None:
    """Bring a classifier trained elsewhere: its architecture by name, its weights, and its input contract
    (size, labels, normalization), declared once and recorded in OUT/model.json. The folder then works
    with train-vector, compose, eval, export, graft and serve, bound to the weights' fingerprint."""
    from forgetrt.train.workflows import import_model

    if labels.startswith("@"):
        try:
            text = Path(labels[1:]).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidInputError(f"cannot read labels file {labels[1:]}: {e}") from e
        names = [ln.strip() for ln in text.splitlines() if ln.strip()]
    else:
        names = [v.strip() for v in labels.split(",") if v.strip()]
    mean, std = _parse_normalize(normalize)
    if program is None and (arch is None or weights is None):
        raise click.UsageError("give --arch and --weights, or --program")
    if program is not None and (arch is not None or weights is not None):
        raise click.UsageError("--program replaces --arch and --weights: give one or the other")
    rec = import_model(
        arch, weights, out, labels=names, image_size=image_size, mean=mean, std=std, data=data, program=program
    )
    acc = f"  test {rec['metrics']['test_acc']:.2f}%" if "test_acc" in rec["metrics"] else ""
    click.echo(f"{rec['arch']}: {len(names)} classes, input {'x'.join(map(str, rec['iospec']['shape']))}{acc} -> {out}")


IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _parse_normalize(text: str) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    t = text.strip().lower()
    if t == "none":
        return None, None
    if t == "imagenet":
        return IMAGENET_MEAN_STD
    m, sep, sd = t.partition("/")
    try:
        mean = tuple(float(v) for v in m.split(","))
        std = tuple(float(v) for v in sd.split(","))
    except ValueError:
        mean = std = ()
    if not sep or not mean or len(mean) != len(std):
        raise InvalidInputError(f"--normalize {text!r}: want imagenet, none, or MEAN,MEAN,MEAN/STD,STD,STD")
    return mean, std


@cli.command("train-vector")
@click.option("--model", "model_dir", type=click.Path(file_okay=False), required=True, help="Model folder.")
@click.option("--data", "data", type=DATA, default="digits", show_default=True)
@_forget_options()
@click.option("--each-class", is_flag=True, help="Train one vector per class (named forget-<class>), batched.")
@click.option("--classes", "each_classes", type=CSV, help="With --each-class: only these classes.")
@click.option(
    "--bank",
    "bank_dir",
    type=click.Path(file_okay=False),
    required=True,
    help="Vector bank folder (created if absent).",
)
@click.option("--name", help="Vector name (not with --each-class).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --forget-fraction and training.")
@_recipe_options
@click.option("--overwrite", is_flag=True, help="Replace vectors of the same name.")
@click.option("--no-eval", is_flag=True, help="Skip evaluation (metrics are not stored in the manifest).")
@_device_option()
def train_vector_cmd(
    model_dir: str,
    data: str,
    forget_classes,
    forget_fraction,
    forget_indices,
    each_class: bool,
    each_classes,
    bank_dir: str,
    name: str | None,
    seed: int,
    overwrite: bool,
    no_eval: bool,
    device: str,
    **kw: Any,
) -> None:
    """Train forget vector(s) against a frozen model and add them to a bank."""
    from forgetrt.train import workflows as wf
    from forgetrt.train.metrics import format_table

    recipe = _recipe(kw, seed)
    if each_class:
        if name or any(x is not None for x in (forget_classes, forget_fraction, forget_indices)):
            raise InvalidInputError(
                "--each-class names its vectors forget-<class>: do not combine it with --name or --forget-*"
            )
        res = wf.train_class_vectors(
            model_dir,
            data,
            bank_dir,
            classes=each_classes,
            recipe=recipe,
            device=device,
            evaluate_after=not no_eval,
            overwrite=overwrite,
        )
    else:
        if not name:
            raise InvalidInputError("--name is required (or use --each-class)")
        spec = ForgetSpec.from_options(forget_classes, forget_fraction, forget_indices, seed=seed)
        res = wf.train_vector(
            model_dir,
            data,
            bank_dir,
            {name: spec},
            recipe,
            device=device,
            evaluate_after=not no_eval,
            overwrite=overwrite,
        )
    if no_eval:
        for r in res:
            click.echo(f"{r['name']}: trained in {r['seconds']:.1f}s")
    else:
        click.echo(format_table({r["name"]: r["metrics"] for r in res}))
    click.echo(f"bank: {bank_dir}")


@cli.command("compose")
@click.option("--bank", "bank_dir", type=click.Path(file_okay=False), required=True)
@click.option("--name", required=True, help="Name of the new vector.")
@click.option("--weights", type=WEIGHTS, help="Fixed combination, e.g. forget-0=1,forget-3=1.")
@click.option("--learn", is_flag=True, help="Learn the coefficients over existing vectors instead.")
@click.option(
    "--refine",
    is_flag=True,
    help="Start from the sum of the target classes' vectors and train the whole vector briefly: much less "
    "damage than --learn where class vectors interfere; the result is a vector of its own, not a combination.",
)
@click.option("--model", "model_dir", type=click.Path(file_okay=False), help="Model folder (--learn, --refine).")
@click.option("--data", "data", type=DATA, default="digits", show_default=True, help="Data spec (--learn, --refine).")
@_forget_options("target")
@click.option("--basis", type=CSV, help="Vectors to combine (--learn; default: every non-composed vector).")
@click.option(
    "--init",
    type=click.Choice(["forgets", "zero"]),
    default="forgets",
    show_default=True,
    help="--learn: start from 1 for the basis vectors of the target classes (forgets), or from 0.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@_recipe_options
@click.option("--overwrite", is_flag=True)
@_device_option()
def compose_cmd(
    bank_dir: str,
    name: str,
    weights,
    learn: bool,
    refine: bool,
    model_dir,
    data: str,
    target_classes,
    target_fraction,
    target_indices,
    basis,
    init: str,
    seed: int,
    overwrite: bool,
    device: str,
    **kw: Any,
) -> None:
    """Forget-vector arithmetic: a fixed or learned linear combination saved as a new vector, or (--refine) a
    vector trained briefly from the sum of the target classes' vectors.

    --learn and --refine train with the preset's recipe for a tenth of its steps (a tenth of the epochs, or
    epochs that run a share of their steps, --epoch-share; --refine also at least two epochs and --gamma
    0.3) unless the recipe options say otherwise."""
    from forgetrt.train import workflows as wf
    from forgetrt.train.recipes import composition_recipe

    method = "refine" if refine else "learn"
    recipe = _recipe(kw, seed, adapt=lambda r: composition_recipe(r, method))
    if learn + refine + (weights is not None) != 1:
        raise InvalidInputError("give exactly one of --weights, --learn or --refine")
    if not learn and init != "forgets":
        raise InvalidInputError("--init applies to --learn only")
    if refine and basis:
        raise InvalidInputError("--basis applies to --learn only (--refine starts from the target classes' vectors)")
    if weights is not None:
        _echo_json(wf.compose_fixed(bank_dir, name, weights, overwrite=overwrite))
        return
    if not model_dir:
        raise InvalidInputError(f"--{method} needs --model")
    spec = ForgetSpec.from_options(target_classes, target_fraction, target_indices, seed=seed, prefix="target")
    res = wf.compose_learned(
        bank_dir,
        name,
        model_dir,
        data,
        spec,
        recipe,
        basis=basis,
        device=device,
        overwrite=overwrite,
        init=init,
        method=method,
    )
    _echo_json(res)


@cli.command("eval")
@click.option("--model", "model_dir", type=click.Path(file_okay=False), required=True)
@click.option("--data", "data", type=DATA, default="digits", show_default=True)
@click.option("--bank", "bank_dir", type=click.Path(file_okay=False))
@click.option("--vector", help="Vector name in the bank.")
@click.option("--weights", type=WEIGHTS, help="Evaluate a combination without saving it.")
@_forget_options()
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --forget-fraction.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the result as JSON.")
@click.option("--reference", type=click.Path(dir_okay=False), help="Reference result JSON (e.g. Retrain) for Avg.Gap.")
@click.option(
    "--mask-forgotten",
    is_flag=True,
    help="Also mask the forgotten classes at the output (class-wise): the trivial guard, alone or with a vector.",
)
@_device_option()
def eval_cmd(
    model_dir: str,
    data: str,
    bank_dir,
    vector,
    weights,
    forget_classes,
    forget_fraction,
    forget_indices,
    seed: int,
    json_out,
    reference,
    mask_forgotten: bool,
    device: str,
) -> None:
    """UA, RA, TA, MIA-Efficacy (and Avg.Gap vs --reference) with a vector applied, in percent; with a
    vector also TA_original (the same classifier without it, same test images) and TA_drop."""
    from forgetrt.runtime.files import atomic_write_json
    from forgetrt.train.metrics import format_table
    from forgetrt.train.workflows import evaluate_result

    spec = ForgetSpec.from_options(forget_classes, forget_fraction, forget_indices, seed=seed, required=False)
    res = evaluate_result(
        model_dir,
        data,
        bank_dir=bank_dir,
        vector=vector,
        weights=weights,
        forget=spec,
        indices_file=forget_indices,
        reference=reference,
        device=device,
        mask_forgotten=mask_forgotten,
    )
    click.echo(format_table({res["evaluated"]: res}))
    if json_out:
        atomic_write_json(json_out, res)
        click.echo(f"json: {json_out}")


@cli.command("unlearn-baseline")
@click.option("--method", type=click.Choice(list(BASELINES)), required=True)
@click.option("--model", "model_dir", type=click.Path(file_okay=False), required=True)
@click.option("--data", "data", type=DATA, default="digits", show_default=True)
@_forget_options()
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Folder for the unlearned model.")
@click.option("--epochs", type=int, help="Override the method's epochs.")
@click.option("--lr", type=float, help="Override the method's learning rate.")
@_device_option()
def baseline_cmd(
    method: str,
    model_dir: str,
    data: str,
    forget_classes,
    forget_fraction,
    forget_indices,
    seed: int,
    out: str,
    epochs,
    lr,
    device: str,
) -> None:
    """Model-based unlearning (Retrain, FT, GA, RL) for comparison; evaluate OUT with `forgetrt eval`."""
    from forgetrt.train.workflows import unlearn_baseline

    spec = ForgetSpec.from_options(forget_classes, forget_fraction, forget_indices, seed=seed)
    rec = unlearn_baseline(method, model_dir, data, spec, out, epochs=epochs, lr=lr, device=device)
    click.echo(f"{method}: {rec['unlearning']['seconds']:.1f}s, test acc {rec['metrics']['test_acc']:.2f}% -> {out}")


@cli.command("bank")
@click.argument("bank_dir", type=click.Path(file_okay=False))
def bank_cmd(bank_dir: str) -> None:
    """Show a bank's vectors: what each forgets, its norm and stored metrics."""
    from forgetrt.runtime.bank import VectorBank

    bank = VectorBank.load(bank_dir)
    click.echo(
        f"bank {bank_dir}: {len(bank)} vectors, shape {bank.iospec.shape}, model {bank.arch} {bank.fingerprint[:12]}"
    )
    for n in bank.names:
        e = bank.entry(n)
        m, f = e.metrics or {}, e.forgets
        what = f.get("labels") or f.get("fraction") or f.get("count") or f.get("kind")
        stats = "  ".join(f"{k} {m[k]:.1f}" for k in ("UA", "RA", "TA", "MIA_efficacy") if k in m)
        click.echo(f"  {n:<20} forgets {what!s:<12} |δ|₂ {e.norm_l2:.3f}  {stats}")


@cli.group("export")
def export_group() -> None:
    """Export a model and its forget vectors as deployable engines."""


class Range(click.ParamType):
    """'LO,HI' -> (lo, hi), finite with lo <= hi."""

    name = "LO,HI"

    def convert(self, value: Any, param: Any, ctx: Any) -> tuple[float, float]:
        if isinstance(value, tuple):
            return value
        try:
            lo, hi = (float(v) for v in str(value).split(","))
        except ValueError:
            self.fail(f"expected LO,HI, got {value!r}", param, ctx)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            self.fail(f"expected finite LO <= HI, got {value!r}", param, ctx)
        return lo, hi


@export_group.command("onnx")
@click.option(
    "--model", "model_dir", type=click.Path(file_okay=False), help="ForgetRT model folder (or use --from-onnx)."
)
@click.option("--from-onnx", type=click.Path(dir_okay=False), help="Graft onto this existing classifier .onnx instead.")
@click.option(
    "--allow-unverified-model", is_flag=True, help="With --from-onnx: graft even if the bank never verified this file."
)
@click.option("--bank", "bank_dir", type=click.Path(file_okay=False), required=True, help="Vector bank folder.")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Bundle folder to write.")
@click.option("--vectors", type=CSV, help="Selectable vectors in coefficient order (default: all but the mandatory).")
@click.option("--mandatory", type=WEIGHTS, help="Vectors baked in for every request, NAME[=w],...")
@click.option("--coeff-range", type=Range(), help="Clip coefficients to LO,HI inside the graph.")
@click.option(
    "--policies", type=click.Path(dir_okay=False), help='JSON file of named compositions, {"eu": {"forget-3": 1}}.'
)
@click.option(
    "--opset", type=int, default=17, show_default=True, help="ONNX opset for --model (a grafted model keeps its own)."
)
@click.option(
    "--guard",
    is_flag=True,
    help="Also mask the classes the (class-wise) mandatory vectors forget at the output: never predicted, "
    "whatever the input.",
)
@click.option(
    "--cancel-threshold",
    type=click.FloatRange(0.0, 1.0),
    default=DEFAULT_CANCEL_THRESHOLD,
    show_default=True,
    help="Refuse selectable vectors that can cancel more than 1 - this of the mandatory δ (L2) within the range.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle folder.")
def export_onnx_cmd(
    model_dir,
    from_onnx,
    allow_unverified_model: bool,
    bank_dir: str,
    out: str,
    vectors,
    mandatory,
    coeff_range,
    policies,
    opset: int,
    guard: bool,
    cancel_threshold: float,
    overwrite: bool,
) -> None:
    """Write a bundle: OUT/model.onnx (image, coeffs -> logits; the bank fused as MatMul -> Reshape -> Add in
    front of the classifier) and OUT/bundle.json. onnxruntime must match the reference within the fp32
    tolerance (1e-4 of the logits' scale), or nothing is written. With --mandatory vectors the graph has no
    overridable bank, the graph's metadata binds it to bundle.json, and selectable vectors that could cancel
    the mandatory ones within the coefficient range are refused (--cancel-threshold)."""
    from forgetrt.export.onnx_export import export_onnx, read_policies

    res = export_onnx(
        bank_dir,
        out,
        model_dir=model_dir,
        from_onnx=from_onnx,
        allow_unverified_model=allow_unverified_model,
        vectors=[str(v) for v in vectors] if vectors else None,
        mandatory=mandatory,
        coeff_range=coeff_range,
        policies=None if policies is None else read_policies(policies),
        opset=opset,
        overwrite=overwrite,
        guard=guard,
        cancel_threshold=cancel_threshold,
    )
    p = res["parity"]
    verified = "" if res["model_verified"] else "  (UNVERIFIED classifier)"
    click.echo(
        f"bundle {res['bundle']} (id {res['bundle_id']}, from {res['source']}){verified}: K={len(res['vectors'])} "
        f"selectable, mandatory {res['mandatory'] or 'none'}"
    )
    click.echo(
        f"parity onnxruntime vs reference: max abs {p['max_abs']:.2e}, mean abs {p['mean_abs']:.2e}, "
        f"{p['rel_to_scale']:.2e} of logit scale"
    )


@export_group.command("classifier")
@click.option("--model", "model_dir", type=click.Path(file_okay=False), required=True)
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="Classifier .onnx to write.")
@click.option(
    "--bank",
    "banks",
    type=click.Path(file_okay=False),
    multiple=True,
    help="Record the file's sha256 in this bank (repeatable).",
)
@click.option("--opset", type=int, default=17, show_default=True)
def export_classifier_cmd(model_dir: str, out: str, banks: tuple[str, ...], opset: int) -> None:
    """Export the bare classifier as ONNX and record it in banks, so `export onnx --from-onnx` can verify it."""
    from forgetrt.export.onnx_export import export_classifier

    res = export_classifier(model_dir, out, banks=banks, opset=opset)
    click.echo(f"{res['onnx']} sha256 {res['sha256'][:16]}… recorded in {len(res['banks'])} bank(s)")


def _batching_options(f: Callable) -> Callable:
    """The BatchingConfig fields, shared by `serve` and `export triton` (one config, one set of defaults)."""
    f = click.option(
        "--idle-dispatch/--no-idle-dispatch",
        default=BatchingConfig.idle_dispatch,
        show_default=True,
        help="Run a request at once when it finds the engine idle and nobody queued behind it (light load); "
        "--no-idle-dispatch always waits --max-queue-delay-us, as Triton does (the Triton export always does).",
    )(f)
    f = click.option(
        "--inline-max-us",
        type=click.IntRange(0),
        default=BatchingConfig.inline_max_us,
        show_default=True,
        help="With idle dispatch, a lone request whose engine call recently took at most this long runs on the "
        "server's event loop itself (no hand-off to the batcher's thread), when no other request is being read, "
        "parsed or run; 0: never. Not in the Triton export.",
    )(f)
    f = click.option(
        "--instances",
        type=int,
        default=BatchingConfig.instances,
        show_default=True,
        help="Engine instances, one batcher worker each.",
    )(f)
    f = click.option(
        "--max-queue",
        type=int,
        default=BatchingConfig.max_queue,
        show_default=True,
        help="Pending requests before they are refused (429).",
    )(f)
    f = click.option(
        "--max-queue-delay-us",
        type=int,
        default=BatchingConfig.max_queue_delay_us,
        show_default=True,
        help="How long a batch waits for more requests.",
    )(f)
    f = click.option(
        "--max-batch-size",
        "--max-batch",
        "max_batch_size",
        type=int,
        default=BatchingConfig.max_batch_size,
        show_default=True,
        help="Images per engine call.",
    )(f)
    return f


def _batching(kw: dict[str, Any]) -> BatchingConfig:
    keys = ("max_batch_size", "max_queue_delay_us", "max_queue", "instances", "idle_dispatch", "inline_max_us")
    return BatchingConfig(**{k: kw.pop(k) for k in keys})


@export_group.command("trt")
@click.option("--bundle", "bundle_dir", type=click.Path(file_okay=False), required=True)
@click.option("--fp16", is_flag=True, help="Allow fp16 kernels (parity tolerance of fp16 instead of fp32).")
@click.option(
    "--min-batch-size",
    "--min-batch",
    "min_batch_size",
    type=int,
    default=TrtBuildConfig.min_batch_size,
    show_default=True,
    help="Optimization profile: smallest batch.",
)
@click.option(
    "--opt-batch-size",
    "--opt-batch",
    "opt_batch_size",
    type=int,
    default=TrtBuildConfig.opt_batch_size,
    show_default=True,
    help="Optimization profile: batch tuned for.",
)
@click.option(
    "--max-batch-size",
    "--max-batch",
    "max_batch_size",
    type=int,
    default=TrtBuildConfig.max_batch_size,
    show_default=True,
    help="Optimization profile: largest batch.",
)
@click.option(
    "--refittable", is_flag=True, help="Build a refittable engine (the bank can be swapped without a rebuild)."
)
@click.option("--workspace-mib", type=int, default=TrtBuildConfig.workspace_mib, show_default=True)
@click.option("--timing-cache", type=click.Path(dir_okay=False), help="Timing cache file to read and update.")
def export_trt_cmd(bundle_dir: str, **kw: Any) -> None:
    """Build BUNDLE/model.plan with TensorRT (one optimization profile over image and coeffs)."""
    from forgetrt.export.tensorrt import build_engine

    res = build_engine(bundle_dir, TrtBuildConfig(**kw))
    click.echo(
        f"engine {res['plan']} (TensorRT {res['tensorrt_version']}, fp16={res['fp16']}, batch "
        f"{res['min_batch_size']}..{res['max_batch_size']})"
    )


@export_group.command("triton")
@click.option("--bundle", "bundle_dir", type=click.Path(file_okay=False), required=True)
@click.option("--repo", type=click.Path(file_okay=False), required=True, help="Triton model repository folder.")
@click.option("--name", help="Model name (default: the bundle folder's name).")
@click.option("--backend", type=click.Choice(list(TRITON_BACKENDS)), default="onnx", show_default=True)
@_batching_options
@click.option("--overwrite", is_flag=True)
@click.option(
    "--accept-clipping",
    is_flag=True,
    help="Needed for a bundle with a coefficient range: Triton runs its graph, which clips out-of-range "
    "coefficients instead of refusing them (build rows with forgetrt.client, which refuses them).",
)
def export_triton_cmd(
    bundle_dir: str, repo: str, name, backend: str, overwrite: bool, accept_clipping: bool, **kw: Any
) -> None:
    """Write a Triton model repository entry (config.pbtxt, 1/model.onnx|plan, labels.txt) for the bundle,
    with the same batching settings as `forgetrt serve`, and the vector names, range, policies and
    mandatory weights as parameters (forgetrt.client turns names into coefficient rows from them)."""
    from forgetrt.export.triton import export_triton

    res = export_triton(
        bundle_dir,
        repo,
        name=name,
        backend=backend,
        batching=_batching(kw),
        overwrite=overwrite,
        accept_clipping=accept_clipping,
    )
    click.echo(f"{res['model_dir']} ({res['platform']}, max_batch_size {res['max_batch_size']})")


def _parity_options(names: list[str], set_options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Route each backend option the user set to the backends among ``names`` that take it."""
    out: dict[str, dict[str, Any]] = {}
    for opt, value in set_options.items():
        owners = [b for b in _BACKEND_OPTION_OWNERS[opt] if b in names]
        if not owners:
            raise InvalidInputError(
                f"--{opt.replace('_', '-')} is an option of {', '.join(_BACKEND_OPTION_OWNERS[opt])}, which this "
                "parity run does not check"
            )
        for b in owners:
            out.setdefault(b, {})[opt] = value
    return out


@cli.command("parity")
@click.argument("bundle_dir", type=click.Path(file_okay=False))
@click.option("--backends", type=CSV, help=f"{','.join(backend_names())} (default: every available one).")
@click.option("--device", type=DEVICE, default="auto", show_default=True, help="Device the backends serve on.")
@_backend_options
@click.option(
    "--data", "data", type=DATA, help="Also compare on this data set's test images (top-1 agreement and accuracy)."
)
@click.option("--limit", type=int, default=512, show_default=True, help="Test images to use with --data.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the report as JSON.")
def parity_cmd(bundle_dir: str, backends, device: str, data, limit: int, seed: int, json_out, **kw: Any) -> None:
    """Compare what serves with the PyTorch fp32 reference: each backend built as `serve` would build it
    (same --device and backend options), run through the runtime on zero, one-hot and random coefficient
    rows, and on real images with --data."""
    from forgetrt.export.parity import format_parity, run_parity
    from forgetrt.runtime.errors import MismatchError
    from forgetrt.runtime.files import atomic_write_json

    names = [str(b) for b in backends] if backends else list(backend_names())
    options = _parity_options(names, _pop_backend_options(kw))
    images = labels = None
    if data is not None:
        if limit < 1:
            raise InvalidInputError(f"--limit must be >= 1, got {limit}")
        from forgetrt.runtime.bundle import Bundle
        from forgetrt.train.data import load_data

        hw = tuple(Bundle.load(bundle_dir).iospec.shape[1:])  # an ImageFolder is resized to the bundle's input
        images, labels = load_data(data, image_size=hw).test_images(limit)
    rep = run_parity(
        bundle_dir,
        [str(b) for b in backends] if backends else None,
        device=device,
        options=options,
        images=images,
        labels=labels,
        seed=seed,
    )
    click.echo(format_parity(rep))
    if json_out:
        atomic_write_json(json_out, rep)
    if not rep["ok"]:
        raise MismatchError(
            "parity failed for: " + ", ".join(b for b, v in rep["backends"].items() if v["status"] == "mismatch")
        )


def _runtime_config(kw: dict[str, Any], *, batching: BatchingConfig | None = None, pixel_policy: str = "reject") -> Any:
    from forgetrt.runtime import RuntimeConfig

    return RuntimeConfig(
        backend=kw.pop("backend"),
        device=kw.pop("device"),
        batching=batching or BatchingConfig(),
        pixel_policy=pixel_policy,
    )


_LIMIT_OPTIONS = _dataclass_options(ServerLimits)
_SCALE_OPTIONS = _dataclass_options(ScaleConfig)
_CLUSTER_OPTIONS = _dataclass_options(ClusterConfig)


def _ray_options(f: Callable) -> Callable:
    return _apply(f, _SCALE_OPTIONS + _CLUSTER_OPTIONS)


def _limit_options(f: Callable) -> Callable:
    return _apply(f, _LIMIT_OPTIONS)


@cli.command("serve", context_settings={"auto_envvar_prefix": "FORGETRT_SERVE", "show_default": True})
@click.argument("bundle_dir", type=click.Path(file_okay=False), envvar="FORGETRT_SERVE_BUNDLE")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option(
    "--grpc-port",
    type=click.IntRange(0, 65535),
    help="Also serve KServe v2 gRPC (tritonclient.grpc, KServe's client) on this port, e.g. 8001 (needs the "
    "'grpc' extra) [default: off].",
)
@click.option(
    "--http",
    "http_impl",
    type=click.Choice(["auto", "httptools", "h11"]),
    default="auto",
    show_default=True,
    help="HTTP/1.1 parser: httptools (C) or h11 (pure Python); auto takes httptools when installed.",
)
@click.option(
    "--loop",
    "event_loop",
    type=click.Choice(["auto", "uvloop", "asyncio"]),
    default="auto",
    show_default=True,
    help="Event loop for REST and gRPC: uvloop (libuv) or asyncio's own; auto takes uvloop when installed.",
)
@click.option(
    "--access-log/--no-access-log",
    default=False,
    show_default=True,
    help="Log one line per HTTP request (uvicorn's access log, at INFO); off, /metrics still counts every response.",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Front-end processes that parse REST (and gRPC) requests and feed this process's engine over Unix "
    "sockets; more than 1 lifts the one-process limit on requests/s. Server limits apply per front end.",
)
@click.option("--backend", type=BACKEND, default="auto", show_default=True)
@click.option("--device", type=DEVICE, default="auto", show_default=True)
@click.option("--model-name", help="Model name in the URLs (default: the bundle folder's name).")
@_batching_options
@click.option("--pixel-policy", type=click.Choice(list(PIXEL_POLICIES)), default="reject", show_default=True)
@click.option(
    "--admin-token-file",
    type=click.Path(dir_okay=False),
    help=f"Bearer token (first line) that may change the served bank; or set {TOKEN_ENV}. Without one, "
    "state-changing endpoints answer 403.",
)
@click.option("--bank-root", type=click.Path(file_okay=False), help="Banks may be loaded only from under this folder.")
@click.option(
    "--verify-key",
    type=click.Path(dir_okay=False),
    help="Public key (PEM) the bundle's signature must verify against (forgetrt sign); a changed bundle is refused.",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False),
    help="Audit log of bank changes and the served bank's state (restored on restart).",
)
@_backend_options
@_limit_options
@click.option(
    "--ray",
    "ray",
    is_flag=True,
    help="Serve on Ray Serve: replicas (GPUs as resources), autoscaling, cluster-wide bank changes (needs the "
    "'ray' extra; README: Scale out).",
)
@click.option(
    "--ray-address", help="Ray cluster to join ('auto': the one `ray start` made here); default: a local one."
)
@_ray_options
def serve_cmd(
    bundle_dir: str,
    host: str,
    port: int,
    grpc_port: int | None,
    http_impl: str,
    event_loop: str,
    workers: int,
    access_log: bool,
    model_name,
    pixel_policy: str,
    admin_token_file,
    bank_root,
    verify_key,
    state_dir,
    ray: bool,
    ray_address: str | None,
    **kw: Any,
) -> None:
    """Serve BUNDLE over the KServe v2 REST protocol (tritonclient.http works), with /metrics, and with
    --grpc-port over KServe v2 gRPC (tritonclient.grpc works). Changing the
    served bank needs an admin token, a bank root and a state folder (see README: Security).

    Every option can also come from the environment: FORGETRT_SERVE_<OPTION> (dashes as underscores, e.g.
    FORGETRT_SERVE_PORT=8080), and the bundle from FORGETRT_SERVE_BUNDLE; a flag on the command line wins."""
    from forgetrt.runtime.control import ControlPlane
    from forgetrt.runtime.server import serve

    options = _pop_backend_options(kw)
    limits = ServerLimits(**{f.name: v for f, _ in _LIMIT_OPTIONS if (v := kw.pop(f.name, None)) is not None})
    control = ControlPlane.from_files(token_file=admin_token_file, bank_root=bank_root, state_dir=state_dir)
    if not control.enabled and (bank_root or state_dir):
        raise InvalidInputError(
            f"--bank-root and --state-dir take effect with an admin token (--admin-token-file or {TOKEN_ENV})"
        )
    scale = {f.name: v for f, _ in _SCALE_OPTIONS if (v := kw.pop(f.name, None)) is not None}
    cluster = {f.name: v for f, _ in _CLUSTER_OPTIONS if (v := kw.pop(f.name, None)) is not None}
    if ray and grpc_port is not None:
        raise InvalidInputError("--grpc-port is not available with --ray (Ray Serve's proxy serves REST here)")
    if ray and workers > 1:
        raise InvalidInputError("--workers is not available with --ray (Ray Serve's proxies and replicas scale out)")
    if not ray and (scale or cluster or ray_address):
        raise InvalidInputError(f"--{next(iter([*scale, *cluster, 'ray_address'])).replace('_', '-')} needs --ray")
    config = _runtime_config(kw, batching=_batching(kw), pixel_policy=pixel_policy)
    if ray:
        return _serve_ray(
            bundle_dir,
            config,
            options,
            ScaleConfig(**scale),
            ClusterConfig(**cluster),
            limits=limits,
            control=control,
            host=host,
            port=port,
            model_name=model_name,
            verify_key=verify_key,
            ray_address=ray_address,
        )
    serve(
        bundle_dir,
        config,
        options,
        host=host,
        port=port,
        grpc_port=grpc_port,
        model_name=model_name,
        limits=limits,
        control=control,
        verify_key=verify_key,
        http=http_impl,
        loop=event_loop,
        workers=workers,
        access_log=access_log,
        log_level=click.get_current_context().find_root().params["log_level"],
        log_format=click.get_current_context().find_root().params["log_format"],
    )


for _p in serve_cmd.params:  # every serve option can come from the environment (containers)
    _p.show_envvar = True


def _serve_ray(bundle_dir, config, options, scale_cfg, cluster_cfg, *, control, ray_address, **kw: Any) -> None:
    """Deploy on Ray Serve, then hold until Ctrl-C or SIGTERM and delete the deployment."""
    import signal
    import threading

    from forgetrt.runtime.deploy import deploy, shutdown

    url = deploy(
        bundle_dir,
        config,
        options,
        scale=scale_cfg,
        cluster=cluster_cfg,
        token=control.token,
        bank_root=None if control.bank_root is None else str(control.bank_root),
        state_dir=None if control.state_dir is None else str(control.state_dir),
        ray_address=ray_address,
        **kw,
    )
    click.echo(f"serving on {url} with Ray Serve ({scale_cfg}); Ctrl-C stops")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        shutdown()


@cli.command("sign")
@click.argument("bundle_dir", type=click.Path(file_okay=False))
@click.option("--key", "key", type=click.Path(dir_okay=False), required=True, help="Elliptic-curve private key (PEM).")
@click.option("--password-env", help="Environment variable holding the key's password, if it is encrypted.")
def sign_cmd(bundle_dir: str, key: str, password_env: str | None) -> None:
    """Sign BUNDLE (every file) with OpenSSF model-signing; `serve --verify-key PUB` then refuses it if it changes."""
    import os

    from forgetrt.runtime.bundle import Bundle
    from forgetrt.runtime.signing import sign_bundle

    Bundle.load(bundle_dir)  # only a bundle that loads is worth signing
    password = os.environ.get(password_env) if password_env else None
    if password_env and password is None:
        raise InvalidInputError(f"environment variable {password_env} is not set")
    click.echo(f"signed: {sign_bundle(bundle_dir, key, password)}")


@cli.command("infer")
@click.argument("bundle_dir", type=click.Path(file_okay=False))
@click.option(
    "--image",
    "images",
    multiple=True,
    required=True,
    type=click.Path(dir_okay=False, exists=True),
    help="PNG/JPEG (resized to the model's input) or .npy float32 [C,H,W] / [N,C,H,W]; repeatable.",
)
@click.option("--forget", type=WEIGHTS, help="Vectors to apply: forget-3 or forget-3=1,forget-7=0.5.")
@click.option("--policy", help="A named composition stored in the bundle.")
@click.option("--backend", type=BACKEND, default="auto", show_default=True)
@click.option("--device", type=DEVICE, default="auto", show_default=True)
@click.option("--top", type=int, default=3, show_default=True)
@_backend_options
def infer_cmd(bundle_dir: str, images: tuple[str, ...], forget, policy, top: int, **kw: Any) -> None:
    """Classify image files with the bundle and a composition of forget vectors (a quick check)."""
    from forgetrt.runtime import Runtime
    from forgetrt.runtime.images import load_images

    if forget and policy:
        raise InvalidInputError("give --forget or --policy, not both")
    options = _pop_backend_options(kw)
    with Runtime.load(bundle_dir, _runtime_config(kw, pixel_policy="clamp"), options) as rt:
        x = load_images(images, rt.iospec)
        res = rt.infer(x, policy if policy else forget)
        click.echo(
            f"backend {rt.backend_name} on {rt.device}, bank version {res.bank_version}, forget "
            f"{policy or forget or 'none (mandatory only)'}"
        )
        names = list(images) if len(x) == len(images) else [f"image {i}" for i in range(len(x))]
        for name, best in zip(names, res.top_k(top, rt.iospec.labels)):
            click.echo(f"  {name}: " + ", ".join(f"{label} {100 * p:.1f}%" for label, p in best))


def _int_list(values: list, what: str) -> tuple[int, ...]:
    if not all(isinstance(v, int) for v in values):
        raise InvalidInputError(f"{what} must be integers, got {values}")
    return tuple(values)


def _check_writable(path: str | None, what: str) -> None:
    """Fail before a long run, not after it, when an output cannot be written."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise InvalidInputError(f"{what} {path} is a directory")
    try:
        existed = p.exists()
        with open(p, "a"):
            pass
        if not existed:
            p.unlink()
    except OSError as e:
        raise InvalidInputError(f"cannot write {what} {path}: {e.strerror}") from None


@cli.command("bench")
@click.argument("bundle_dir", type=click.Path(file_okay=False), required=False)
@click.option(
    "--url",
    help="Measure a running server instead of BUNDLE in process: http://host:port (REST) or host:port (gRPC).",
)
@click.option("--protocol", type=click.Choice(["rest", "grpc"]), default="rest", show_default=True, help="With --url.")
@click.option("--model", "model_name", help="With --url: the served model's name.")
@click.option(
    "--client-processes",
    type=click.IntRange(1, 256),
    default=2,
    show_default=True,
    help="With --url: processes the closed-loop clients are spread over (threads within each).",
)
@click.option("--backend", type=BACKEND, default="auto", show_default=True)
@click.option("--device", type=DEVICE, default="auto", show_default=True)
@click.option(
    "--batch",
    "batches",
    type=CSV,
    default=",".join(map(str, BenchConfig.batches)),
    show_default=True,
    help="Images per request.",
)
@click.option(
    "--concurrency",
    type=CSV,
    default=",".join(map(str, BenchConfig.concurrency)),
    show_default=True,
    help="Closed-loop clients; >1 goes through the dynamic batcher.",
)
@click.option(
    "--mix",
    type=click.Choice(list(MIXES)),
    default=BenchConfig.mix,
    show_default=True,
    help="Same composition for every request, or a different one each.",
)
@click.option(
    "--active-vectors",
    type=CSV,
    default=",".join(map(str, BenchConfig.active_vectors)),
    show_default=True,
    help="Non-zero coefficients per request (0: mandatory only).",
)
@click.option(
    "--duration", type=float, default=BenchConfig.duration, show_default=True, help="Timed seconds per point."
)
@click.option("--warmup", type=float, default=BenchConfig.warmup, show_default=True, help="Warm-up seconds per point.")
@click.option(
    "--max-queue-delay-us",
    type=int,
    default=BatchingConfig.max_queue_delay_us,
    show_default=True,
    help="The batcher's wait for more requests.",
)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write one JSON line per point.")
@click.option(
    "--plot",
    "plot_out",
    type=click.Path(dir_okay=False),
    help="Write a PNG: latency vs batch, throughput vs concurrency.",
)
@click.option("--compare-bare", is_flag=True, help="Also time the classifier without the forget prefix (onnxruntime).")
@_backend_options
def bench_cmd(
    bundle_dir: str | None,
    url: str | None,
    protocol: str,
    model_name: str | None,
    client_processes: int,
    batches,
    concurrency,
    mix: str,
    active_vectors,
    duration: float,
    warmup: float,
    max_queue_delay_us: int,
    json_out,
    plot_out,
    compare_bare: bool,
    **kw: Any,
) -> None:
    """Latency and throughput of BUNDLE through the runtime: min/mean/p50/p90/p95/p99/max, images/s,
    requests/s, queue vs compute time; one JSON line per point with the runtime config, versions and device.
    With --url (and --model), the same grid against a running server over REST or gRPC."""
    from forgetrt.runtime import Runtime
    from forgetrt.runtime.bench import BenchConfig, plot_results, run_bench, summarize, write_jsonl

    if (bundle_dir is None) == (url is None):
        raise InvalidInputError("give BUNDLE_DIR (in process) or --url (a running server), not both")
    if url is None and (model_name or protocol != "rest"):
        raise InvalidInputError("--model and --protocol go with --url")

    cfg = BenchConfig(
        _int_list(batches, "--batch"),
        _int_list(concurrency, "--concurrency"),
        _int_list(active_vectors, "--active-vectors"),
        mix,
        duration,
        warmup,
        compare_bare,
    )
    _check_writable(json_out, "--json file")
    _check_writable(plot_out, "--plot file")
    options = _pop_backend_options(kw)
    if url is not None:
        from forgetrt.runtime.bench_remote import RemoteTarget, run_remote_bench, summarize_remote

        if not model_name:
            raise InvalidInputError("--url needs --model (the served model's name)")
        if options or compare_bare:
            raise InvalidInputError("backend options and --compare-bare belong to the server, not to --url")
        target = RemoteTarget(url, model_name, protocol, client_processes)
        records = run_remote_bench(target, cfg)
        click.echo(summarize_remote(records))
        if json_out:
            write_jsonl(records, json_out)
            click.echo(f"json lines: {json_out}")
        if plot_out:
            plot_results(records, plot_out)
            click.echo(f"plot: {plot_out}")
        return
    batching = BatchingConfig(max_batch_size=max(cfg.batches), max_queue_delay_us=max_queue_delay_us, max_queue=4096)
    with Runtime.load(bundle_dir, _runtime_config(kw, batching=batching), options) as rt:
        records = run_bench(rt, cfg)
    click.echo(summarize(records))
    if json_out:
        write_jsonl(records, json_out)
        click.echo(f"json lines: {json_out}")
    if plot_out:
        plot_results(records, plot_out)
        click.echo(f"plot: {plot_out}")


@cli.command("demo")
@click.option("--out", type=click.Path(file_okay=False), default="forgetrt-demo", show_default=True)
@_device_option("cpu")
def demo_cmd(out: str, device: str) -> None:
    """The main job on sklearn's digits (no download): model, class vectors, compositions, metrics."""
    from forgetrt.tools.demo import run_demo

    run_demo(Path(out), device=device, log=click.echo)


def main() -> None:
    cli(prog_name="forgetrt")


if __name__ == "__main__":
    main()
