"""ForgetRT: forget vectors (input-space unlearning perturbations) as deployable engines.

Subpackages:

- :mod:`forgetrt.runtime` — contracts (IOSpec, vector bank, errors) and serving; never imports torch.
- :mod:`forgetrt.train` — PyTorch side: data, models, forget-vector training, metrics, baselines.
- :mod:`forgetrt.export` — ONNX / TensorRT export.
- :mod:`forgetrt.tools` — the ``forgetrt`` command line.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
