"""Model-based unlearning baselines the paper compares against (one model copy per request):

- ``retrain``: train from scratch on the retain set only (the gold standard; Avg.Gap reference)
- ``ft``: fine-tune the original on the retain set (catastrophic forgetting of the forget set)
- ``ga``: gradient ascent on the forget set
- ``rl``: random labels: fine-tune on the forget set with wrong random labels plus the retain set
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from torch import nn

from .data import Dataset, ForgetSplit
from .loops import DeviceData, fit, train_classifier
from .recipes import BaselineConfig

__all__ = ["run_baseline"]


def run_baseline(
    cfg: BaselineConfig, arch: str, original: nn.Module, ds: Dataset, split: ForgetSplit, device: torch.device
) -> tuple[nn.Module, float]:
    """Return the unlearned model and its wall time in seconds."""
    t0 = time.perf_counter()
    if cfg.method == "retrain":
        model, _, _ = train_classifier(arch, ds, cfg.train, device, train_idx=split.retain)
        return model, time.perf_counter() - t0
    model = copy.deepcopy(original).to(device)
    for p in model.parameters():
        p.requires_grad_(True)
    if cfg.method == "ft":
        fit(
            model,
            DeviceData(ds.x_train, ds.y_train, ds.scale, device, rows=split.retain),
            cfg.train,
            desc="FT",
        )
    elif cfg.method == "ga":
        data = DeviceData(ds.x_train, ds.y_train, ds.scale, device, rows=split.forget)
        fit(model, data, cfg.train, desc="GA", ascent_idx=torch.arange(len(data)))
    else:  # rl
        idx = np.concatenate([split.forget, split.retain])
        y = ds.y_train.copy()
        rng = np.random.default_rng(cfg.train.seed)
        shift = rng.integers(1, ds.num_classes, len(split.forget))  # a label that is never the true one
        y[split.forget] = (y[split.forget] + shift) % ds.num_classes
        fit(model, DeviceData(ds.x_train, y, ds.scale, device, rows=idx), cfg.train, desc="RL")
    model.eval()
    return model, time.perf_counter() - t0
