"""Training loops and their PyTorch plumbing: devices, batching of uint8 data, inference with a forget vector, and
classifier training (used by ``train-model`` and the Retrain/FT/RL baselines)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from forgetrt.runtime.architectures import create_model
from forgetrt.runtime.errors import InvalidInputError, unknown
from forgetrt.runtime.iospec import IOSpec
from forgetrt.runtime.logs import progress

from .data import Dataset
from .recipes import TrainConfig

__all__ = [
    "resolve_device",
    "DeviceData",
    "predict_logits",
    "train_classifier",
    "fit",
    "iospec_for",
    "accuracy",
    "seed_everything",
]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without CUDA is an error, never a silent fallback."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InvalidInputError(
                f"device {device!r} requested but CUDA is not available (torch {torch.__version__})"
            )
        return torch.device(device)
    raise unknown("device", device, ["auto", "cpu", "cuda"])


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    return torch.Generator().manual_seed(seed)


def _row_indices(rows: np.ndarray) -> np.ndarray:
    """Integer row indices from indices or a boolean mask (a mask selects its True rows, as numpy does)."""
    rows = np.asarray(rows)
    return np.flatnonzero(rows) if rows.dtype == bool else rows.astype(np.int64, copy=False)


class DeviceData:
    """uint8 images kept once on the device; batches come out as float [0, 1] tensors.

    A memory-mapped set (a large ImageFolder, see :mod:`forgetrt.train.imagefolder`) stays on the host:
    each batch is gathered from the mapping (``rows`` selects which of its images this set holds, so
    no subset is ever copied whole) and moved to the device."""

    def __init__(
        self, x: np.ndarray, y: np.ndarray, scale: float, device: torch.device, rows: np.ndarray | None = None
    ) -> None:
        rows = None if rows is None else _row_indices(rows)
        self.streamed = isinstance(x, np.memmap)
        if self.streamed:
            self.x = x
            self.rows = np.arange(len(x)) if rows is None else rows
        else:
            self.x = torch.from_numpy(np.ascontiguousarray(x if rows is None else x[rows])).to(device)
        y = y if rows is None else y[rows]
        self.y = torch.from_numpy(np.ascontiguousarray(y)).long().to(device)
        self.scale = float(scale)
        self.device = device

    def __len__(self) -> int:
        return len(self.y)

    def images(self, idx: torch.Tensor | slice) -> torch.Tensor:
        if not self.streamed:
            return self.x[idx].float().div_(self.scale)
        sel = self.rows[idx] if isinstance(idx, slice) else self.rows[idx.cpu().numpy()]
        order = np.argsort(sel, kind="stable")  # read the mapping in file order, then restore the batch's
        batch = np.empty((len(sel), *self.x.shape[1:]), np.uint8)
        batch[order] = self.x[sel[order]]
        return torch.from_numpy(batch).to(self.device, non_blocking=True).float().div_(self.scale)


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if t.is_cuda and t.dim() == 4 else t


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    x: np.ndarray | DeviceData,
    scale: float | None = None,
    delta: np.ndarray | torch.Tensor | None = None,
    *,
    batch_size: int = 1024,
    device: torch.device | None = None,
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """float32 logits of ``model(x / scale + delta)`` for uint8 images (those at ``rows`` of ``x``, if
    given: a memory-mapped set is then read batch by batch, never copied whole), in eval mode."""
    device = device or next(model.parameters()).device
    if isinstance(x, DeviceData):
        data = x
    else:
        data = DeviceData(x, np.zeros(len(x), np.int64), float(scale or 1.0), device, rows=rows)
    d = None
    if delta is not None:
        d = torch.as_tensor(delta, dtype=torch.float32, device=device)
    was_training = model.training
    model.eval()
    out = []
    for s in range(0, len(data), batch_size):
        xb = data.images(slice(s, s + batch_size))
        if d is not None:
            xb = xb + d
        out.append(model(_channels_last(xb)).float().cpu())
    model.train(was_training)
    if not out:
        return np.zeros((0, 0), np.float32)
    return torch.cat(out).numpy()


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    """Share of correct argmax predictions, in percent (NaN for an empty set)."""
    if len(y) == 0:
        return float("nan")
    return float((logits.argmax(1) == y).mean() * 100.0)


def iospec_for(ds: Dataset, train_idx: np.ndarray | None = None) -> IOSpec:
    """The IOSpec of a classifier trained on ``ds``: normalization constants from the images it trains on."""
    mean, std = ds.channel_stats(train_idx)
    return IOSpec(shape=ds.shape, mean=mean, std=std, labels=ds.classes)


def augment_batch(x: torch.Tensor, gen: torch.Generator | None = None, mode: str = "crop-flip") -> torch.Tensor:
    """Per-sample random crop with zero padding (1 pixel for "shift", 4 for "crop-flip") and, for
    "crop-flip", a random horizontal flip; runs on the batch's device."""
    if mode == "none":
        return x
    pad = 1 if mode == "shift" else 4
    n, c, h, w = x.shape
    dev = x.device
    xp = nn.functional.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,), device="cpu", generator=gen).to(dev)
    ox = torch.randint(0, 2 * pad + 1, (n,), device="cpu", generator=gen).to(dev)
    rows = (oy[:, None] + torch.arange(h, device=dev))[:, :, None]  # [n, h, 1]
    cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, :]  # [n, 1, w]
    bidx = torch.arange(n, device=dev)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[bidx, rows, cols].permute(0, 3, 1, 2)  # [n, c, h, w]
    if mode != "crop-flip":
        return out
    flip = (torch.rand(n, generator=gen) < 0.5).to(dev)
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def _batches(n: int, batch_size: int, gen: torch.Generator, drop_last: bool) -> Iterator[torch.Tensor]:
    perm = torch.randperm(n, generator=gen)
    stop = n - (n % batch_size) if drop_last and n >= batch_size else n
    for s in range(0, stop, batch_size):
        yield perm[s : s + batch_size]


def fit(
    model: nn.Module,
    data: DeviceData,
    cfg: TrainConfig,
    *,
    desc: str = "train",
    labels: torch.Tensor | None = None,
    ascent_idx: torch.Tensor | None = None,
) -> dict[str, float]:
    """Train ``model`` in place on ``data`` (optionally with replacement ``labels``).

    ``ascent_idx`` marks samples whose loss is *maximized* (gradient ascent), used by the GA baseline.
    Mixed precision (bf16) and channels-last on CUDA; plain fp32 on CPU.
    """
    device = data.device
    gen = torch.Generator().manual_seed(cfg.seed)
    y_all = data.y if labels is None else labels.to(device)
    sign = None
    if ascent_idx is not None:
        sign = torch.ones(len(data), device=device)
        sign[ascent_idx.to(device)] = -1.0
    steps_per_epoch = max(1, len(data) // cfg.batch_size) if len(data) >= cfg.batch_size else 1
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.25, anneal_strategy="linear"
    )
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    model.train()
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    t0 = time.perf_counter()
    loss_val = float("nan")
    with progress(total=cfg.epochs * steps_per_epoch, desc=desc, unit="step", leave=False) as bar:
        for _epoch in range(cfg.epochs):
            correct, seen = 0, 0
            for i, idx in enumerate(_batches(len(data), min(cfg.batch_size, len(data)), gen, drop_last=True)):
                if i >= steps_per_epoch:
                    break
                idx = idx.to(device)
                xb = data.images(idx)
                xb = augment_batch(xb, gen, cfg.augment)
                yb = y_all[idx]
                with amp:
                    logits = model(_channels_last(xb))
                    per = nn.functional.cross_entropy(logits.float(), yb, reduction="none")
                    loss = (per * sign[idx]).mean() if sign is not None else per.mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                # accumulate on the device: reading a value every step would stall the GPU pipeline
                correct = correct + (logits.argmax(1) == yb).sum()
                seen += len(yb)
                bar.update(1)
                if i % 25 == 0 or i == steps_per_epoch - 1:
                    loss_val = float(loss.detach())
                    bar.set_postfix(loss=f"{loss_val:.3f}", acc=f"{100 * float(correct) / max(seen, 1):.1f}")
            loss_val = float(loss.detach())
    model.eval()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - t0, "final_loss": loss_val}


def load_body_weights(model: nn.Module, state: dict[str, torch.Tensor], *, strict: bool) -> list[str]:
    """Load a classifier body's state dict (torchvision/timm keys; a ``module.`` prefix is dropped) into
    ``model`` = Normalize -> body. Not strict: tensors whose shape differs (a head for other classes) are
    skipped and returned. Strict: any missing, unexpected or misshapen key is an InvalidInputError."""
    body = model[1]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = body.state_dict()
    skipped = sorted(k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape))
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if strict and (skipped or missing or unexpected):
        parts = [
            f"{what} {keys[:5]}{' …' if len(keys) > 5 else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("misshapen", skipped))
            if keys
        ]
        raise InvalidInputError("the weights do not fit the architecture: " + "; ".join(parts))
    if not strict and len(missing) + len(skipped) == len(own):
        raise InvalidInputError("the weights share no tensor with the architecture: wrong --arch?")
    body.load_state_dict({k: v for k, v in state.items() if k in own and k not in skipped}, strict=False)
    return skipped + [k for k in missing if k not in skipped]


def _check_outputs(model: nn.Module, spec: IOSpec, arch: str) -> None:
    """A classifier returns one logits tensor [N, classes] for a batch, in training and in eval mode
    (checked on a copy, with the random generator restored: no side effect on the training that follows)."""
    import copy

    with torch.random.fork_rng(devices=[]):
        x = torch.rand(2, *spec.shape)
    model = copy.deepcopy(model)
    for mode in (True, False):
        model.train(mode)
        try:
            with torch.no_grad():
                y = model(x)
        except Exception as e:  # noqa: BLE001 - any failure here means this arch cannot take this input
            raise InvalidInputError(
                f"{arch} does not run on images of {spec.shape[1]}x{spec.shape[2]}: {type(e).__name__}: {str(e)[:200]}"
            ) from e
        if not isinstance(y, torch.Tensor) or tuple(y.shape) != (2, spec.num_classes):
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise InvalidInputError(
                f"{arch} returns {got} in {'training' if mode else 'eval'} mode, not logits of shape "
                f"(N, {spec.num_classes}): not a plain classifier"
            )


def train_classifier(
    arch: str,
    ds: Dataset,
    cfg: TrainConfig,
    device: torch.device,
    *,
    train_idx: np.ndarray | None = None,
    init_state: dict[str, torch.Tensor] | None = None,
) -> tuple[nn.Module, IOSpec, dict[str, Any]]:
    """Train a fresh classifier (on ``train_idx`` only, if given: the Retrain baseline), or fine-tune one
    started from ``init_state`` (a body state dict; tensors that do not fit, such as another head, are
    left at their fresh values and listed in the stats as ``reinitialized``)."""
    seed_everything(cfg.seed)
    spec = iospec_for(ds, train_idx)  # the held-out split (and for Retrain the forget set) stays out of it
    model = create_model(arch, spec)
    reinit = load_body_weights(model, init_state, strict=False) if init_state is not None else None
    _check_outputs(model, spec, arch)
    model = model.to(device)
    data = DeviceData(ds.x_train, ds.y_train, ds.scale, device, rows=train_idx)
    stats: dict[str, Any] = dict(fit(model, data, cfg, desc=f"train {arch}"))
    if reinit is not None:
        stats["reinitialized"] = reinit
    return model, spec, stats
