"""`flashmoe.MoELayer`: a torch.nn.Module over one native FlashMoE layer.

    layer = flashmoe.MoELayer(flashmoe.MoEConfig(hidden=2048, intermediate=768, experts=128, top_k=8),
                              {"router": r, "gate_up": w13, "down": w2})        # CUDA bf16 tensors
    y = layer(x)                                                               # x [..., 2048] bf16, same device

The library copies (packs) the weights at creation, so the layer holds its own copy next to the tensors it was
built from. It rebuilds that copy when the tensors change: after `.to()` / `.cuda()` / `.half()` (through `_apply`),
after `load_state_dict`, and — checked on every eager call — after an in-place edit (a tensor's version counter
moved) or a swap of its storage. Under `torch.compile` and during CUDA graph capture no rebuild can happen: call
`refresh()` yourself after editing weights there.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable, Mapping

import torch

from . import _lib
from .config import MoEConfig
from .native import NativeLayer
from . import torch_op
from .torch_op import tensor_info


_version_of = operator.attrgetter("_version")
_address_of = torch.Tensor.data_ptr


class WeightSource:
    """Where a MoELayer's weights come from: `tensors` are the live tensors whose changes force a rebuild and
    `build()` returns the dict of header-named weights to create the native layer from (views of `tensors`, or
    temporaries such as a concatenated shared expert)."""

    def __init__(self, tensors: Callable[[], list[torch.Tensor]], build: Callable[[], dict[str, torch.Tensor]]):
        self.tensors = tensors
        self.build = build


def _close_native(layer_id: int, holder: list) -> None:
    """Finalizer: unbinds the id and destroys the native layer once its device is idle."""
    torch_op.bind(layer_id, None)
    native = holder[0] if holder else None
    if native is not None and not native.closed:
        try:
            if native.backend == _lib.BACKEND_CUDA and torch.cuda.is_initialized():
                torch.cuda.synchronize(native.device)
            native.close()
        except Exception:  # noqa: BLE001 - finalizers must not raise (interpreter shutdown, a dead context)
            pass


class MoELayer(torch.nn.Module):
    """One MoE layer (gate, top-k routing, experts, shared expert, combine) run by FlashMoE.

    Args:
        config: the layer's shape and options (`flashmoe.MoEConfig`).
        weights: header-named tensors (router, selection_bias, gate_up or gate + up, down, b1, b2, shared_gate_up,
            shared_up, shared_down, shared_gate), all on one device (CPU -> the CPU backend, CUDA -> the GPU), in
            the storage dtype (float32 / bfloat16 / float16), biases and the selection bias in float32. fp8
            layers: the routed experts' matrices in bfloat16 (quantized at creation) or torch.float8_e4m3fn with
            their float32 block scales (gate_up_scale or gate_scale + up_scale, and down_scale: DeepSeek-V3's
            weight_scale_inv, stacked over experts). They are kept as (persistent) buffers under those names.
        source: instead of `weights`, a `WeightSource` (used by `from_hf_block`; nothing is registered then).
    """

    def __init__(self, config: MoEConfig, weights: Mapping[str, torch.Tensor] | None = None, *,
                 source: WeightSource | None = None):
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a flashmoe.MoEConfig, got {type(config).__name__}")
        config.validate()
        if (weights is None) == (source is None):
            raise ValueError("MoELayer takes exactly one of weights= and source=")
        if weights is not None:
            if not isinstance(weights, Mapping):
                raise TypeError(f"weights must be a mapping of names to tensors, got {type(weights).__name__}")
            for name, tensor in weights.items():
                if name not in _lib.Weights.POINTERS:
                    raise ValueError(f"weights: unknown name {name!r}; the names are {list(_lib.Weights.POINTERS)}")
                if not isinstance(tensor, torch.Tensor):
                    raise TypeError(f"weights[{name!r}] must be a torch.Tensor, got {type(tensor).__name__}")
                self.register_buffer(name, tensor)
            names = list(weights)
            buffers = self._buffers  # read directly: nn.Module.__getattr__ is slow on the hot path
            source = WeightSource(lambda: [buffers[n] for n in names], lambda: {n: buffers[n] for n in names})
        self.config = config
        self._source = source
        self.layer_id = torch_op.new_layer_id()
        self._holder: list = [None]  # the NativeLayer, in a list the finalizer can see without seeing self
        self._tracked: list = []  # the source's tensors when the native layer was built
        self._signature: tuple[list[int], list[int]] = ([], [])  # (versions, addresses) of _tracked
        self._finalizer = weakref.finalize(self, _close_native, self.layer_id, self._holder)
        self.refresh()

    # -- the native layer -------------------------------------------------------------------------------------------

    @property
    def native(self) -> NativeLayer:
        """The open native layer."""
        native = self._holder[0]
        if native is None or native.closed:
            raise ValueError("layer: this MoELayer has been closed")
        return native

    @staticmethod
    def _signature_of(tensors) -> tuple[list[int], list[int]]:
        # map() over C-level getters: about half the cost of a per-tensor Python loop (read on every eager call).
        return [*map(_version_of, tensors)], [*map(_address_of, tensors)]

    def _source_changed(self) -> bool:
        """Whether the source's tensors differ (other objects, storage or version) from those the layer was built
        from."""
        return self._signature_of(self._source.tensors()) != self._signature

    def refresh(self) -> None:
        """(Re)creates the native layer from the current weights: after editing them in place under torch.compile or
        before capturing a CUDA graph. Waits for the old layer's device before freeing it."""
        weights = self._source.build()
        if not weights or "router" not in weights:
            raise ValueError("weights: missing 'router' [E, H]")
        devices = {str(t.device) for t in weights.values()}
        if len(devices) != 1:
            raise ValueError(f"weights must all be on one device, got {sorted(devices)}")
        device = next(iter(weights.values())).device
        if device.type == "meta":
            raise ValueError("weights are on the meta device: load the checkpoint (or materialise the weights) first")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"weights must be on cpu or cuda, got {device}")
        infos = {name: tensor_info(t, f"weights[{name!r}]") for name, t in weights.items()}
        precision = self.config.resolved_precision(infos["router"].dtype, infos["down"].dtype if "down" in infos else None)
        backend = _lib.BACKEND_CUDA if device.type == "cuda" else _lib.BACKEND_CPU
        index = device.index if device.type == "cuda" else 0
        if backend == _lib.BACKEND_CUDA and index is None:
            index = torch.cuda.current_device()
        native = NativeLayer(self.config, infos, precision=precision, backend=backend, device=index)
        old, self._holder[0] = self._holder[0], native
        torch_op.bind(self.layer_id, native)
        bound = torch_op.lookup(self.layer_id)
        # Plain attributes (constants to torch.compile) for what callers ask on every call.
        self._device, self._storage, self._output = bound.device, bound.storage, bound.output
        self._tracked = self._source.tensors()
        self._signature = self._signature_of(self._tracked)
        del weights
        if old is not None and not old.closed:
            if old.backend == _lib.BACKEND_CUDA:
                torch.cuda.synchronize(old.device)
            old.close()

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        if self._holder[0] is not None and self._source_changed():
            # A parent's .to()/.cuda() moves its modules one at a time: with a source (from_hf_block) this layer's
            # turn may come before all the block's weights have moved. The block rebuilds it once they all have
            # (FlashMoEBlock._apply); an eager call would too (_ensure_current).
            if len({t.device for t in self._source.tensors()}) == 1:
                self.refresh()
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        # The buffers were overwritten in place; the version check would catch it too, but only on the next eager
        # call, which may be inside a graph capture.
        if self._holder[0] is not None and self._source_changed():
            self.refresh()

    def _ensure_current(self) -> None:
        """Eager calls only: rebuilds the native layer when a weight it was built from changed in place (its version
        counter moved) or had its storage swapped. (New tensor objects arrive through _apply or load_state_dict.)"""
        native = self._holder[0]
        if native is None or native.closed:
            raise ValueError("layer: this MoELayer has been closed")
        tracked, (versions, addresses) = self._tracked, self._signature
        if [*map(_version_of, tracked)] == versions and [*map(_address_of, tracked)] == addresses:
            return
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("MoELayer: the weights changed since the layer was built and a CUDA graph is being "
                               "captured; call refresh() before capturing")
        self.refresh()

    # -- calls ------------------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Where the layer runs (and where x must be)."""
        return self._device

    @property
    def storage_dtype(self) -> torch.dtype:
        """x's dtype."""
        return self._storage

    @property
    def output_dtype(self) -> torch.dtype:
        """y's dtype (the storage dtype on the GPU unless config.output == "float32"; float32 on the CPU)."""
        return self._output

    def forward(self, x: torch.Tensor, *, stream: torch.cuda.Stream | None = None, return_routing: bool = False):
        """y [..., H] for x [..., H] (contiguous, the storage dtype, the layer's device, at most max_tokens rows).

        With `return_routing`, returns (y, topk_ids [N, k] int32, topk_weights [N, k] float32), N = the rows.
        `stream`: a CUDA stream of the layer's device to run on (default: the current stream)."""
        if not torch.compiler.is_compiling():
            self._ensure_current()
        hidden = self.config.hidden
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        shape = x.shape
        if not shape or shape[-1] != hidden:
            raise ValueError(f"x must have shape [..., {hidden}], got {list(shape)}")
        if not x.is_contiguous():
            raise ValueError("x must be contiguous (row-major); pass x.contiguous()")
        flat = x if len(shape) == 2 else x.view(-1, hidden)
        # Without return_routing the op that returns y alone: the routing stays in the library's workspace, which
        # saves two output allocations per call.
        op = torch_op.moe_forward if return_routing else torch_op.moe_forward_y
        if stream is None:
            out = op(flat, self.layer_id)
        else:
            self._check_stream(stream)
            with torch.cuda.stream(stream):
                out = op(flat, self.layer_id)
        y = out[0] if return_routing else out
        if len(shape) != 2:
            y = y.view(shape)
        return (y, out[1], out[2]) if return_routing else y

    def _check_stream(self, stream) -> None:
        device = self.device
        if device.type != "cuda":
            raise ValueError("stream must be None for a CPU layer (the CPU backend runs synchronously)")
        if not isinstance(stream, torch.cuda.Stream):
            raise TypeError(f"stream must be a torch.cuda.Stream, got {type(stream).__name__}")
        if stream.device != device:
            raise ValueError(f"stream is on {stream.device}, but the layer is on {device}: pass a stream of {device}")

    def check(self, synchronize: bool = False) -> None:
        """Raises FlashMoEKernelError if an earlier forward's kernel recorded a fault (the layer is then reset and
        the next call runs). With `synchronize`, first waits for the current stream."""
        native = self.native
        stream = torch_op._raw_stream(native.device) if native.backend == _lib.BACKEND_CUDA else 0
        native.check(synchronize, stream)

    def info(self) -> dict:
        """What the library holds: max_tokens, weight_bytes, workspace_bytes, backend, device, grid_blocks."""
        return self.native.info()

    def close(self) -> None:
        """Waits for the layer's device and frees the native layer; later calls raise ValueError."""
        self._finalizer()

    def extra_repr(self) -> str:
        """The shapes, router, token limit and device shown by `print(module)`."""
        c = self.config
        native = self._holder[0]
        where = f"{native.device_name}, {native.precision}" if native is not None and not native.closed else "closed"
        shared = f", shared_I={c.shared_intermediate}" if c.shared_intermediate else ""
        return (f"H={c.hidden}, I={c.intermediate}, E={c.experts}, k={c.top_k}, {c.ffn} {c.activation}, "
                f"{c.router} router{shared}, max_tokens={c.max_tokens}, {where}")

    # -- transformers ---------------------------------------------------------------------------------------------

    @classmethod
    def from_hf_block(cls, block: torch.nn.Module, config=None, **options) -> "MoELayer":
        """A MoELayer computing what a transformers MoE block computes (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3;
        transformers 5's fused experts or 4's per-expert modules), reading the block's own parameters: nothing is
        registered on the returned layer, so it adds no state_dict entries. `config` is the model's config
        (default: the block's or its experts' `config` attribute); `options` set MoEConfig fields such as
        max_tokens, precision, output."""
        from .hf import describe_block

        moe_config, source = describe_block(block, config, **options)
        return cls(moe_config, source=source)
