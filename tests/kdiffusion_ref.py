"""Import k-diffusion 0.1.1.post1 (the reference for samplers and the original model) in tests.

Its package ``__init__`` imports every submodule, among them training and evaluation code that needs
torchvision, clean-fid, scikit-image and wandb. None of that is needed for sampling or for the model
classes, and torchvision from PyPI does not import beside the CPU build of torch that the test
environment uses (a matching pair is a multi-GB CUDA download). So this helper loads only the
submodules we compare against, with an empty ``torchvision`` stand-in for the one
``from torchvision.transforms import functional`` line in ``k_diffusion.utils`` (used there only by
image helpers we never call). The real torchvision is used when it imports.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


_STAND_IN = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")


def _stand_in_torchvision() -> bool:
    """Put an empty torchvision in sys.modules unless the real one imports; True if it did."""
    try:
        import torchvision  # noqa: F401
        return False
    except Exception:
        pass
    for name in _STAND_IN:
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]
    return True


def _remove_stand_in() -> None:
    # the stand-in must not outlive k-diffusion's import: transformers and diffusers probe for
    # torchvision with importlib.util.find_spec, which fails on a module without a spec
    for name in _STAND_IN:
        sys.modules.pop(name, None)


def import_k_diffusion():
    """The ``k_diffusion`` package with ``sampling``, ``layers``, ``utils`` and ``models`` loaded."""
    if "k_diffusion" in sys.modules and hasattr(sys.modules["k_diffusion"], "sampling"):
        return sys.modules["k_diffusion"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        raise ImportError("k-diffusion is not installed; scripts/test installs it (pip install --no-deps k-diffusion==0.1.1.post1)")
    stood_in = _stand_in_torchvision()
    package = types.ModuleType("k_diffusion")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules["k_diffusion"] = package
    try:
        for name in ("utils", "sampling", "layers", "models", "external"):
            setattr(package, name, importlib.import_module(f"k_diffusion.{name}"))
    finally:
        if stood_in:
            _remove_stand_in()
    return package
