"""Forget-vector training and forget-vector arithmetic.

The objective (the paper's code), per mini-batch of B samples mixing forget and retain data, with the
classifier frozen and BatchNorm in eval mode, δ added in [0, 1] pixel space::

    α · Σ_retain CE(f(x+δ), y) / B  +  β · Σ_forget max(z_y − max_{j≠y} z_j, −τ) / B  +  λ · ‖δ‖₂

optimized by SGD (momentum 0.9, lr 0.2) with ExponentialLR(0.9) per epoch, δ starting at 0 (or at a
given vector: a warm start, as ``compose --refine`` does from the sum of class vectors).

Two optional terms (``VectorRecipe``): ``distill`` κ adds κ·T²·KL(softmax(z⁰/T) ‖ softmax(z/T)) on retain
samples, z⁰ the frozen model's logits on the clean image; ``forget_loss="masked-kd"`` replaces the margin by
β·T²·KL(softmax(m(z⁰)/T) ‖ softmax(z/T)) on forget samples, m setting to −∞ the logit of the sample's own
class and, for a spec of whole classes, of every class it forgets: they are pulled towards what the
original model would say with those classes removed at its output (the output-mask reference), rather
than pushed past whichever class is nearest.

Independent problems (one vector per class, say) are trained *together*: their parameters are
stacked into one tensor [P, ...], each step draws one batch per problem, and all P·B perturbed
images go through the frozen model in one forward/backward pass. The problems stay independent
(the total loss is a sum of per-problem terms over disjoint parameters), but ten vectors cost far
less than ten separate runs.

Learned composition is the same loop over a different parametrization: δ = c @ bank, where only
the coefficients c (start 0, L2 on c) are trained.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from forgetrt.runtime.errors import InvalidInputError
from forgetrt.runtime.logs import progress

from .data import Dataset, ForgetSpec
from .loops import DeviceData, _channels_last, augment_batch
from .recipes import VectorRecipe

__all__ = ["TrainedVector", "train_vectors", "learn_composition"]


@dataclass
class TrainedVector:
    name: str
    vector: np.ndarray  # float32 [C, H, W]
    spec: ForgetSpec
    seconds: float  # wall time share of this vector (group time / group size)
    coefficients: dict[str, float] | None = None  # learned composition only


def _margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y − max_{j≠y} z_j per sample."""
    zy = logits.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    other = logits.scatter(-1, y.unsqueeze(-1), float("-inf")).amax(-1)
    return zy - other


def _objective(
    logits: torch.Tensor,
    y: torch.Tensor,
    is_forget: torch.Tensor,
    params: torch.Tensor,
    r: VectorRecipe,
    original: torch.Tensor | None = None,
    forgotten: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-problem loss [P] for logits [P, B, C], labels [P, B], forget mask [P, B], params [P, ...].

    ``original``: the frozen model's logits on the same clean images (no δ), needed when
    ``r.distill > 0``: the retain samples then also pay κ·T²·KL(softmax(original/T) ‖ softmax(logits/T)),
    which holds the model's whole output on retain data where it was, not only its argmax; and when
    ``r.forget_loss == "masked-kd"`` (see the module's docstring), which also masks ``forgotten`` [P, C]
    (the classes each problem forgets whole; none: only each sample's own class).
    """
    if original is None and r.uses_original_logits:
        raise InvalidInputError("the distillation and masked-kd terms need the original model's logits")
    b = logits.shape[1]
    ce = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)
    fmask = is_forget.float()
    retain_term = r.alpha * (ce * (1 - fmask)).sum(1) / b
    t = r.distill_temperature
    if r.distill > 0:
        kl = nn.functional.kl_div(
            nn.functional.log_softmax(logits / t, -1),
            nn.functional.log_softmax(original / t, -1),
            reduction="none",
            log_target=True,
        ).sum(-1)
        retain_term = retain_term + r.distill * t * t * (kl * (1 - fmask)).sum(1) / b
    if r.forget_loss == "masked-kd":
        drop = torch.zeros_like(original, dtype=torch.bool).scatter(-1, y.unsqueeze(-1), True)
        if forgotten is not None:
            drop = drop | forgotten[:, None, :]
        q = torch.softmax(original.masked_fill(drop, float("-inf")) / t, -1)  # 0 on every masked class
        per_sample = (torch.special.xlogy(q, q) - q * nn.functional.log_softmax(logits / t, -1)).sum(-1) * t * t
    else:
        per_sample = _margin(logits, y).clamp(min=-r.tau)
    forget_term = (per_sample * fmask).sum(1) / b
    reg = torch.linalg.vector_norm(params.flatten(1), dim=1)
    return retain_term + r.beta * forget_term + r.lam * reg


class _Sampler:
    """Per-problem batch indices: a fresh permutation of the training set per epoch (natural mix),
    or, with ``forget_share``, a fixed number of forget samples per batch drawn from a cycling
    permutation of the forget set."""

    def __init__(self, masks: np.ndarray, r: VectorRecipe, gen: torch.Generator) -> None:
        self.masks = masks  # [P, N] bool
        self.r = r
        self.gen = gen
        n = masks.shape[1]
        self.b = min(r.batch_size, n)
        # a share of an epoch: its first steps, rounded down (a composition never runs over its budget)
        self.steps = max(1, math.floor(math.ceil(n / self.b) * r.epoch_share + 1e-9))

    def epoch(self) -> list[torch.Tensor]:
        p, n = self.masks.shape
        if self.r.forget_share is None:
            perms = torch.stack([torch.randperm(n, generator=self.gen) for _ in range(p)])
            pad = self.steps * self.b - n  # last batch wraps around instead of being short
            if pad > 0:
                perms = torch.cat([perms, perms[:, :pad]], 1)
            return list(perms[:, : self.steps * self.b].reshape(p, self.steps, self.b).unbind(1))
        nf = max(1, int(round(self.r.forget_share * self.b)))
        nr = self.b - nf
        out = []
        groups = []
        for m in self.masks:
            f, rt = np.flatnonzero(m), np.flatnonzero(~m)
            fi = torch.from_numpy(f)[torch.randint(len(f), (self.steps * nf,), generator=self.gen)]
            ri = torch.from_numpy(rt)[
                torch.randperm(len(rt), generator=self.gen).repeat(math.ceil(self.steps * nr / len(rt)) + 1)[
                    : self.steps * nr
                ]
            ]
            groups.append((fi.view(self.steps, nf), ri.view(self.steps, nr)))
        for s in range(self.steps):
            out.append(torch.stack([torch.cat([fi[s], ri[s]]) for fi, ri in groups]))
        return out


def _optimize(
    model: nn.Module,
    data: DeviceData,
    masks: np.ndarray,
    params: torch.Tensor,
    to_delta,
    r: VectorRecipe,
    desc: str,
    project=None,
    forgotten: np.ndarray | None = None,
) -> torch.Tensor:
    """Run the paper's optimizer over ``params`` [P, ...]; ``to_delta(params) -> [P, C, H, W]``;
    ``project(params)``, if given, runs in place after every step (the norm budget); ``forgotten`` [P, C]: the
    classes each problem forgets whole (masked-kd's target masks them)."""
    device = data.device
    gen = torch.Generator().manual_seed(r.seed)
    params = params.detach().clone().to(device).requires_grad_(True)
    opt = torch.optim.SGD([params], lr=r.lr, momentum=r.momentum)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=r.gamma)
    sampler = _Sampler(masks, r, gen)
    fmask_dev = torch.from_numpy(masks).to(device)
    forgotten_dev = None if forgotten is None else torch.from_numpy(forgotten).to(device)
    p = masks.shape[0]
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    with progress(total=r.epochs * sampler.steps, desc=desc, unit="step", leave=False) as bar:
        for _ in range(r.epochs):
            # running counts stay on the device; reading them every step would stall the GPU pipeline
            counts = torch.zeros(4, device=device)
            for step, idx in enumerate(sampler.epoch()):
                idx = idx.to(device)  # [P, B]
                x = data.images(idx.flatten())
                x = augment_batch(x, gen, r.augment)
                x = x.view(p, -1, *x.shape[1:])
                y = data.y[idx]
                is_forget = fmask_dev.gather(1, idx)
                delta = to_delta(params)
                original = None
                with amp:
                    logits = model(_channels_last((x + delta[:, None]).flatten(0, 1))).float().view(p, x.shape[1], -1)
                    if r.uses_original_logits:
                        with torch.no_grad():
                            original = model(_channels_last(x.flatten(0, 1))).float().view_as(logits)
                loss = _objective(logits, y, is_forget, params, r, original, forgotten_dev)
                opt.zero_grad(set_to_none=True)
                loss.sum().backward()
                if r.grad_clip is not None:
                    with torch.no_grad():
                        g = params.grad.flatten(1)
                        g.mul_((r.grad_clip / g.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0))
                opt.step()
                if project is not None:
                    with torch.no_grad():
                        project(params)
                with torch.no_grad():
                    correct = logits.argmax(-1) == y
                    counts += torch.stack(
                        [
                            (~correct & is_forget).sum(),
                            is_forget.sum(),
                            (correct & ~is_forget).sum(),
                            (~is_forget).sum(),
                        ]
                    )
                bar.update(1)
                if step % 25 == 0 or step == sampler.steps - 1:
                    ua_hits, ua_n, ra_hits, ra_n = counts.tolist()
                    bar.set_postfix(
                        loss=f"{float(loss.detach().mean()):.3f}",
                        UA=f"{100 * ua_hits / max(ua_n, 1):.1f}",
                        RA=f"{100 * ra_hits / max(ra_n, 1):.1f}",
                    )
            sched.step()
    return params.detach()


def _frozen(model: nn.Module) -> nn.Module:
    model.eval()  # BN uses running statistics; dropout off
    for prm in model.parameters():
        prm.requires_grad_(False)
    if next(model.parameters()).is_cuda:
        model.to(memory_format=torch.channels_last)
    return model


def _masks(ds: Dataset, specs: Sequence[ForgetSpec], held_out: np.ndarray | None) -> np.ndarray:
    masks = np.zeros((len(specs), len(ds.y_train)), bool)
    for i, s in enumerate(specs):
        masks[i, s.resolve(ds, held_out).forget] = True
    return masks


def _forgotten_classes(ds: Dataset, specs: Sequence[ForgetSpec], r: VectorRecipe) -> np.ndarray | None:
    """[P, num_classes] bool: the classes each spec forgets whole (none for fractions and index files), for
    masked-kd's target; refuses a spec that would leave no class to pull its samples towards."""
    if r.forget_loss != "masked-kd":
        return None
    out = np.zeros((len(specs), ds.num_classes), bool)
    for i, sp in enumerate(specs):
        if sp.classes is not None:
            out[i, [ds.class_index(c) for c in sp.classes]] = True
    if out.all(1).any():
        raise InvalidInputError("masked-kd needs at least one class the vector does not forget")
    return out


def _training_set(ds: Dataset, masks: np.ndarray, exclude: np.ndarray | None, device) -> tuple[DeviceData, np.ndarray]:
    """The images vector training may draw from (all but ``exclude``) on the device, and the masks on them."""
    keep = np.ones(len(ds.y_train), bool)
    if exclude is not None and len(exclude):
        keep[np.asarray(exclude, np.int64)] = False
    sub = masks[:, keep]
    if not sub.any(axis=1).all():
        raise InvalidInputError("a forget set lies entirely in the validation split: nothing left to train on")
    return DeviceData(ds.x_train, ds.y_train, ds.scale, device, rows=np.flatnonzero(keep)), sub


def _check_finite(params: torch.Tensor, names: Sequence[str]) -> None:
    bad = [n for n, p in zip(names, params) if not torch.isfinite(p).all()]
    if bad:
        raise InvalidInputError(
            f"training diverged for {bad}: the vector holds NaN or Inf; lower the learning rate or the loss weights"
        )


def _union(*parts: np.ndarray | None) -> np.ndarray:
    arrays = [np.asarray(p, np.int64) for p in parts if p is not None and len(p)]
    return np.unique(np.concatenate(arrays)) if arrays else np.zeros(0, np.int64)


def _norm_projection(budget: float | None):
    if budget is None:
        return None

    def project(params: torch.Tensor) -> None:
        norms = params.flatten(1).norm(dim=1).clamp_min(1e-12)
        params.mul_((budget / norms).clamp(max=1.0).view(-1, *([1] * (params.dim() - 1))))

    return project


def train_vectors(
    model: nn.Module,
    ds: Dataset,
    specs: Mapping[str, ForgetSpec],
    recipe: VectorRecipe = VectorRecipe(),
    *,
    device: torch.device | None = None,
    held_out: np.ndarray | None = None,
    exclude: np.ndarray | None = None,
    init: Mapping[str, np.ndarray] | None = None,
) -> list[TrainedVector]:
    """Train one forget vector per named spec, up to ``recipe.max_parallel`` problems per pass.

    ``held_out``: the classifier's held-out training indices (in no forget or retain set);
    ``exclude``: training indices the vectors must not see (the validation split they are tuned on);
    ``init``: starting vectors by name (a warm start, e.g. a composition to refine); the rest start at 0.
    """
    if not specs:
        raise InvalidInputError("no forget spec given")
    device = device or next(model.parameters()).device
    model = _frozen(model.to(device))
    names = list(specs)
    init = dict(init or {})
    if set(init) - set(names):
        raise InvalidInputError(f"starting vectors for unknown problems {sorted(set(init) - set(names))}")
    for n, v in init.items():
        if np.shape(v) != tuple(ds.shape) or not np.isfinite(v).all():
            raise InvalidInputError(f"starting vector {n!r} must be finite with shape {tuple(ds.shape)}")
    masks = _masks(ds, [specs[n] for n in names], held_out)  # validates every spec before any training
    forgotten = _forgotten_classes(ds, [specs[n] for n in names], recipe)
    data, masks = _training_set(ds, masks, _union(held_out, exclude), device)
    project = _norm_projection(recipe.norm_budget)
    out: list[TrainedVector] = []
    for g in range(0, len(names), recipe.max_parallel):
        group = names[g : g + recipe.max_parallel]
        t0 = time.perf_counter()
        start = torch.zeros(len(group), *ds.shape)
        for i, n in enumerate(group):
            if n in init:
                start[i] = torch.from_numpy(np.asarray(init[n], np.float32))
        label = group[0] if len(group) == 1 else f"{len(group)} vectors"
        deltas = _optimize(
            model,
            data,
            masks[g : g + len(group)],
            start,
            lambda prm: prm,
            recipe,
            f"forget vectors ({label})",
            project,
            None if forgotten is None else forgotten[g : g + len(group)],
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        per = (time.perf_counter() - t0) / len(group)
        _check_finite(deltas, group)
        for n, d in zip(group, deltas.cpu().numpy().astype(np.float32)):
            out.append(TrainedVector(n, d, specs[n], per))
    return out


def learn_composition(
    model: nn.Module,
    ds: Dataset,
    spec: ForgetSpec,
    basis: Mapping[str, np.ndarray],
    recipe: VectorRecipe,
    *,
    name: str = "composed",
    device: torch.device | None = None,
    held_out: np.ndarray | None = None,
    exclude: np.ndarray | None = None,
    init: Mapping[str, float] | None = None,
) -> TrainedVector:
    """Learn coefficients c over existing vectors so δ = Σ c_k v_k unlearns ``spec`` (c starts at ``init``,
    default 0); ``held_out`` and ``exclude`` as for :func:`train_vectors`."""
    if not basis:
        raise InvalidInputError("learned composition needs at least one existing vector in the bank")
    device = device or next(model.parameters()).device
    model = _frozen(model.to(device))
    keys = list(basis)
    bank = torch.from_numpy(np.stack([basis[k] for k in keys]).astype(np.float32)).to(device)  # [K, C, H, W]
    masks = _masks(ds, [spec], held_out)
    data, masks = _training_set(ds, masks, _union(held_out, exclude), device)
    project = None
    if recipe.norm_budget is not None:  # bound ‖Σ c_k v_k‖₂ by scaling the coefficients

        def project(c: torch.Tensor) -> None:
            norm = torch.einsum("pk,kchw->pchw", c, bank).flatten(1).norm(dim=1).clamp_min(1e-12)
            c.mul_((recipe.norm_budget / norm).clamp(max=1.0).view(-1, 1))

    t0 = time.perf_counter()
    coeffs = (
        _optimize(
            model,
            data,
            masks,
            torch.tensor([[float((init or {}).get(k, 0.0)) for k in keys]]),
            lambda c: torch.einsum("pk,kchw->pchw", c, bank),
            recipe,
            f"compose {name}",
            project,
            _forgotten_classes(ds, [spec], recipe),
        )[0]
        .cpu()
        .numpy()
    )
    _check_finite(torch.from_numpy(coeffs)[None], [name])
    vector = np.einsum("k,kchw->chw", coeffs, bank.cpu().numpy()).astype(np.float32)
    return TrainedVector(name, vector, spec, time.perf_counter() - t0, {k: float(c) for k, c in zip(keys, coeffs)})
