"""diffusers' memory and speed switches for the pipeline: attention slicing, xformers, CPU offload,
VAE slicing and tiling, FreeU.

The pipeline inherits :class:`PipelineSwitches`; each switch forwards to the model that implements
it (``unet.set_attention_slice``, ``vae.enable_slicing``, …) under diffusers' name and meaning.

Offloading keeps every weight in a map of CPU tensors and leaves the model's parameters on the
``meta`` device (no storage) until they are needed on the *execution device*, where the pipeline
then creates latents and embeddings (:attr:`PipelineSwitches.device`):

- sequential (:meth:`~PipelineSwitches.enable_sequential_cpu_offload`): accelerate's ``cpu_offload``,
  as in diffusers: each submodule's weights come to the device for its own forward and go again.
- model (:meth:`~PipelineSwitches.enable_model_cpu_offload`): our :class:`ModelOffload`: a whole model
  comes to the device when it is first used and goes when another model is used, so at most one of
  text encoder, UNet and VAE is resident (diffusers keeps the VAE resident through the UNet loop when
  the input is pixels). Going back costs no copy: the CPU map already holds the weights.

On a machine without an accelerator the execution device is the CPU; offloading then saves nothing,
but the meta placeholders between uses are the same, which is what the tests check.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

DeviceLike = Union[str, torch.device, None]

#: models of the pipeline in the order an upscale uses them (diffusers' ``model_cpu_offload_seq``)
OFFLOAD_ORDER = ("text_encoder", "unet", "vae")


def default_accelerator() -> torch.device:
    """The first available of CUDA (or ROCm), Apple MPS and Intel XPU; the CPU when none is."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return torch.device("xpu")
    return torch.device("cpu")


def execution_device(gpu_id: Optional[int] = None, device: DeviceLike = None) -> torch.device:
    """diffusers' rule: ``device`` (default :func:`default_accelerator`) with index ``gpu_id`` (default
    the index in ``device``, else 0); the CPU takes no index."""
    device = default_accelerator() if device is None else torch.device(device)
    if gpu_id is not None and device.index is not None:
        raise ValueError(f"pass the accelerator index either as gpu_id={gpu_id} or inside device={device}, not both")
    if device.type == "cpu":
        if gpu_id is not None:
            raise ValueError(f"gpu_id={gpu_id} was given but the execution device is the CPU, which has no index")
        return device
    return torch.device(device.type, gpu_id if gpu_id is not None else device.index or 0)


class _OffloadedWeights:
    """One model's parameters and buffers, kept as CPU tensors; the model holds either meta
    placeholders (offloaded) or copies on the execution device (loaded). Tied tensors stay tied."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.slots: List[Tuple[nn.Module, str, int]] = []  # (owner, attribute, index into tensors)
        self.cpu: List[torch.Tensor] = []
        self.is_param: List[bool] = []
        self.requires_grad: List[bool] = []
        index: Dict[int, int] = {}
        for module in model.modules():
            for table, is_param in ((module._parameters, True), (module._buffers, False)):
                for name, tensor in table.items():
                    if tensor is None:
                        continue
                    if id(tensor) not in index:
                        index[id(tensor)] = len(self.cpu)
                        self.cpu.append(tensor.detach().to("cpu"))
                        self.is_param.append(is_param)
                        self.requires_grad.append(tensor.requires_grad)
                    self.slots.append((module, name, index[id(tensor)]))
        self.meta = [t.to("meta") for t in self.cpu]

    def load(self, device: torch.device) -> None:
        self._assign([t.to(device, non_blocking=True) for t in self.cpu])

    def offload(self) -> None:
        self._assign(self.meta)

    def restore(self) -> None:
        """Put the CPU tensors themselves back: the model is an ordinary CPU model again."""
        self._assign(self.cpu)

    def _assign(self, tensors: List[torch.Tensor]) -> None:
        wrapped = [nn.Parameter(t, requires_grad=g) if p else t
                   for t, p, g in zip(tensors, self.is_param, self.requires_grad)]
        for module, name, i in self.slots:
            (module._parameters if self.is_param[i] else module._buffers)[name] = wrapped[i]


class ModelOffload:
    """Model-level CPU offload: whole models move to ``device`` when used, one at a time.

    A forward pre-hook on each model and on its direct children (so that ``vae.encode`` and
    ``vae.decode``, which are not ``forward``, trigger it too) loads that model and offloads the one
    loaded before. Weights live in a CPU map; offloaded models hold meta placeholders.
    """

    def __init__(self, models: Dict[str, nn.Module], device: torch.device):
        self.device = device
        self.weights = {name: _OffloadedWeights(model) for name, model in models.items()}
        self.resident: Optional[str] = None
        self.handles = []
        for name, model in models.items():
            weights = self.weights[name]
            weights.offload()
            for module in (model, *model.children()):
                self.handles.append(module.register_forward_pre_hook(self._loader(name)))

    def _loader(self, name: str) -> Callable:
        def hook(module, args):
            self.use(name)

        return hook

    def use(self, name: str) -> None:
        """Make ``name`` the one model on the execution device."""
        if self.resident == name:
            return
        self.offload_all()
        self.weights[name].load(self.device)
        self.resident = name

    def offload_all(self) -> None:
        if self.resident is not None:
            self.weights[self.resident].offload()
            self.resident = None

    def remove(self) -> None:
        """Remove the hooks and make every model an ordinary CPU model again."""
        for handle in self.handles:
            handle.remove()
        for weights in self.weights.values():
            weights.restore()
        self.resident = None


class _SequentialOffload:
    """accelerate's ``cpu_offload`` on each model, with the CPU maps kept so that it can be undone."""

    def __init__(self, models: Dict[str, nn.Module], device: torch.device):
        try:
            from accelerate import cpu_offload
        except ImportError as e:
            raise ModuleNotFoundError(
                "enable_sequential_cpu_offload needs accelerate: `pip install accelerate`", name="accelerate"
            ) from e
        self.device = device
        self.models = models
        self.state_dicts = {}
        for name, model in models.items():
            state_dict = {key: tensor.to("cpu") for key, tensor in model.state_dict().items()}
            self.state_dicts[name] = state_dict
            # buffers are offloaded too when the top module holds parameters itself, as in diffusers
            cpu_offload(model, device, offload_buffers=len(model._parameters) > 0, state_dict=state_dict)

    def offload_all(self) -> None:
        """Nothing to do: weights leave the device after every submodule's forward."""

    def remove(self) -> None:
        from accelerate.hooks import remove_hook_from_module

        for name, model in self.models.items():
            remove_hook_from_module(model, recurse=True)
            model.load_state_dict(self.state_dicts[name], strict=True, assign=True)
            model.to("cpu")


class PipelineSwitches:
    """The memory and speed switches of diffusers' pipelines, for a class with ``text_encoder``,
    ``unet`` (our K-UNet) and ``vae`` (our AutoencoderKL) attributes. See the module docstring."""

    _offload: Optional[Union[ModelOffload, _SequentialOffload]] = None

    # ---- where the pipeline computes ----

    @property
    def device(self) -> torch.device:
        """The execution device: where latents and embeddings are made. With CPU offload the one
        offloading runs on (the models' own weights then sit on the meta device)."""
        return self._execution_device

    @property
    def _execution_device(self) -> torch.device:
        if self._offload is not None:
            return self._offload.device
        return self.unet.device

    # ---- attention ----

    def enable_attention_slicing(self, slice_size: Union[str, int, None] = "auto") -> None:
        """Compute the UNet's attention a few heads at a time, for less peak memory at some speed.

        ``slice_size``: "auto" halves each layer's heads (two steps), "max" takes one head at a time,
        an int that many heads (at most the fewest heads of any layer: 6 for the hub model); the
        result is the same up to rounding. Only the UNet is sliced, as in diffusers. PyTorch's SDPA,
        the default, is already memory-efficient; slicing mostly slows it down.
        """
        self.unet.set_attention_slice(slice_size)

    def disable_attention_slicing(self) -> None:
        """Compute attention in one step again."""
        self.unet.set_attention_slice(None)

    def enable_xformers_memory_efficient_attention(self, attention_op: Optional[Callable] = None) -> None:
        """Compute the attention of the UNet and the VAE with xformers' ``memory_efficient_attention``
        (``op=attention_op``; None lets xformers choose). Needs xformers and a CUDA GPU, and says so
        otherwise. While on, it takes precedence over attention slicing."""
        for model in (self.unet, self.vae):
            model.set_use_memory_efficient_attention_xformers(True, attention_op)

    def disable_xformers_memory_efficient_attention(self) -> None:
        """Back to PyTorch's scaled_dot_product_attention (sliced, if slicing is on)."""
        for model in (self.unet, self.vae):
            model.set_use_memory_efficient_attention_xformers(False)

    # ---- VAE ----

    def enable_vae_slicing(self) -> None:
        """Encode and decode a batch one image at a time: less memory for batches, same results."""
        self.vae.enable_slicing()

    def disable_vae_slicing(self) -> None:
        self.vae.disable_slicing()

    def enable_vae_tiling(self) -> None:
        """Encode and decode large images in overlapping tiles (see ``vae.enable_tiling``)."""
        self._vae_tiling("enable_tiling")()

    def disable_vae_tiling(self) -> None:
        self._vae_tiling("disable_tiling")()

    def _vae_tiling(self, method: str) -> Callable[[], None]:
        switch = getattr(self.vae, method, None)
        if switch is None:
            raise NotImplementedError(
                f"{type(self.vae).__name__} has no {method}(): VAE tiling needs latent_upscaler's AutoencoderKL "
                "(load the pipeline with from_pretrained), or pass max_memory / vae_tile_size to the call"
            )
        return switch

    # ---- FreeU ----

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        """FreeU (Si et al. 2023, arXiv:2309.11497): ``b1``, ``b2`` (> 1) amplify the backbone
        features and ``s1``, ``s2`` (< 1) damp the low frequencies of the skip features in the up
        blocks of the two coarsest skip levels (``up_blocks.1`` and ``up_blocks.2``, see
        ``KUNet.enable_freeu``). diffusers accepts this call for the latent upscaler and silently
        ignores it (its K blocks never read the values); here it changes the result.
        """
        self.unet.enable_freeu(s1=s1, s2=s2, b1=b1, b2=b2)

    def disable_freeu(self) -> None:
        """Turn FreeU off; results are then exactly those without it."""
        self.unet.disable_freeu()

    # ---- CPU offload ----

    def enable_sequential_cpu_offload(self, gpu_id: Optional[int] = None, device: DeviceLike = None) -> None:
        """Least memory, slowest: every submodule's weights come from a CPU map to the execution
        device for its own forward and leave again (accelerate's ``cpu_offload``; needs accelerate).

        The execution device is ``device`` (default: the available accelerator — CUDA, MPS or XPU —
        else the CPU) with index ``gpu_id``. Call it on a pipeline that is still on the CPU, and do not
        move the pipeline with ``to()`` afterwards; :meth:`remove_all_hooks` undoes it.
        """
        self._start_offload(_SequentialOffload, execution_device(gpu_id, device))

    def enable_model_cpu_offload(self, gpu_id: Optional[int] = None, device: DeviceLike = None) -> None:
        """Less memory at little cost in speed: each whole model (text encoder, UNet, VAE) comes to the
        execution device when it is used and leaves when another model is used; between uses its
        weights are kept on the CPU only (the model's parameters are meta placeholders).

        ``gpu_id`` and ``device`` as in :meth:`enable_sequential_cpu_offload`. After a call, the last
        model used stays resident until :meth:`maybe_free_model_hooks` or the next model's use.
        """
        self._start_offload(ModelOffload, execution_device(gpu_id, device))

    def _refuse_while_offloaded(self, what: str) -> None:
        if getattr(self, "_offload", None) is not None:
            raise RuntimeError(f"{what} cannot run while CPU offload is on (the weights sit in hooks); "
                               "call pipe.remove_all_hooks() first")

    def maybe_free_model_hooks(self) -> None:
        """Offload whatever model is resident (model offload); hooks stay armed for the next call."""
        if self._offload is not None:
            self._offload.offload_all()

    def remove_all_hooks(self) -> None:
        """Undo CPU offload: hooks removed, every model an ordinary model on the CPU again."""
        if self._offload is not None:
            self._offload.remove()
            self._offload = None

    def _start_offload(self, kind, device: torch.device) -> None:
        self.remove_all_hooks()
        models = {name: getattr(self, name) for name in OFFLOAD_ORDER
                  if isinstance(getattr(self, name, None), nn.Module)}
        for model in models.values():
            model.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        self._offload = kind(models, device)
