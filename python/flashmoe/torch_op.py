"""The `flashmoe::moe_forward` custom op and the checked torch call under it.

    y, topk_ids, topk_weights = torch.ops.flashmoe.moe_forward(x, layer_id)

`x` [S, H] in the layer's storage dtype on the layer's device; `layer_id` is the int a `flashmoe.MoELayer` registers
its native layer under (`MoELayer.layer_id`). The op is functional: it returns fresh tensors y [S, H] (the layer's
output dtype), topk_ids [S, k] int32 and topk_weights [S, k] float32 and mutates nothing. On CUDA it enqueues one
kernel launch on `torch.cuda.current_stream(x.device)` and returns (capturable in a CUDA graph); on the CPU it runs
the CPU backend before returning. The fake implementation gives `torch.compile(fullgraph=True)` the output metadata
from the registered layer, so the op traces without a graph break. There is no backward (inference only).

    torch.ops.flashmoe.moe_forward_out(x, layer_id, y, topk_ids, topk_weights)

is the same call into outputs the caller keeps (checked like x), for loops that should not allocate.

Non-finite input (docs/nonfinite.md) raises nothing: a token whose x holds a NaN gets topk_ids = -1 and
topk_weights = 0 and y = 0 (NaN with a shared expert); ids are always in [0, E) or -1, so index experts with ids >= 0
only. Every other token is bit-identical to the run without it.
"""

from __future__ import annotations

import itertools
import threading

import torch

from . import _lib
from ._checks import ALIGNMENT, ArrayInfo, check_array, check_forward
from .native import NativeLayer

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# ---------------------------------------------------------------------------------------------------------------------
# The registry: op calls name a layer by an int (custom ops cannot take Python objects).

_registry: dict[int, "BoundLayer"] = {}
_registry_lock = threading.Lock()
_next_id = itertools.count(1)


class BoundLayer:
    """A NativeLayer with the torch facts the hot path needs precomputed (dtypes, device)."""

    __slots__ = ("native", "hidden", "top_k", "max_tokens", "storage", "output", "device", "device_index",
                 "is_cuda", "forward_raw", "storage_name", "output_name", "device_name")

    def __init__(self, native: NativeLayer):
        self.native = native
        self.hidden, self.top_k, self.max_tokens = native.hidden, native.top_k, native.max_tokens
        self.storage = _TORCH_DTYPES[native.storage_dtype]
        self.output = _TORCH_DTYPES[native.output_dtype]
        self.is_cuda = native.backend == _lib.BACKEND_CUDA
        self.device = torch.device("cuda", native.device) if self.is_cuda else torch.device("cpu")
        self.device_index = native.device
        self.storage_name, self.output_name = native.storage_dtype, native.output_dtype
        self.device_name = str(self.device)
        self.forward_raw = native.forward_raw


def new_layer_id() -> int:
    """A fresh id for `bind`."""
    return next(_next_id)


def bind(layer_id: int, native: NativeLayer | None) -> None:
    """Points `layer_id` at `native` (None removes it)."""
    with _registry_lock:
        if native is None:
            _registry.pop(layer_id, None)
        else:
            _registry[layer_id] = BoundLayer(native)


def lookup(layer_id: int) -> BoundLayer:
    """The layer bound to `layer_id`; ValueError when there is none (closed, or never created)."""
    bound = _registry.get(layer_id)
    if bound is None:
        raise ValueError(f"layer: no open flashmoe layer has id {layer_id} (closed, or not a MoELayer.layer_id)")
    return bound


# ---------------------------------------------------------------------------------------------------------------------
# The checked call

if hasattr(torch._C, "_cuda_getCurrentRawStream"):
    _raw_stream = torch._C._cuda_getCurrentRawStream
else:  # CPU-only builds, or a torch that renamed it
    def _raw_stream(index: int) -> int:
        return torch.cuda.current_stream(index).cuda_stream


def tensor_info(t, name: str) -> ArrayInfo:
    """Describes a tensor for the shared checks; anything else is a TypeError naming the argument."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return ArrayInfo(name, tuple(t.shape), str(t.dtype).removeprefix("torch."), t.is_contiguous(), t.data_ptr(),
                     str(t.device))


def _explain(bound: BoundLayer, x) -> None:
    """Raises the precise error for an x the fast path refused."""
    check_forward(tensor_info(x, "x"), [], hidden=bound.hidden, max_tokens=bound.max_tokens,
                  storage=bound.storage_name, device=bound.device_name)
    raise ValueError(f"x: refused ({x.shape}, {x.dtype}, {x.device})")  # unreachable unless the checks disagree


def _check_x(bound: BoundLayer, x) -> None:
    # The fast path: one condition per rule; any failure goes to _explain for the message.
    if not (isinstance(x, torch.Tensor) and x.dim() == 2 and x.dtype == bound.storage and x.device == bound.device
            and x.shape[1] == bound.hidden and x.shape[0] <= bound.max_tokens and x.is_contiguous()
            and (x.data_ptr() % ALIGNMENT == 0 or x.numel() == 0)):
        _explain(bound, x)


def run(bound: BoundLayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checks x, allocates the outputs and calls the library (on the current stream of x's device for CUDA)."""
    _check_x(bound, x)
    tokens = x.shape[0]
    y = torch.empty((tokens, bound.hidden), dtype=bound.output, device=bound.device)
    ids = torch.empty((tokens, bound.top_k), dtype=torch.int32, device=bound.device)
    weights = torch.empty((tokens, bound.top_k), dtype=torch.float32, device=bound.device)
    stream = _raw_stream(bound.device_index) if bound.is_cuda else 0
    bound.forward_raw(x.data_ptr(), y.data_ptr(), tokens, ids.data_ptr(), weights.data_ptr(), stream)
    return y, ids, weights


def run_out(bound: BoundLayer, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> None:
    """Like `run`, into the caller's outputs (checked: shape, dtype, device, contiguous, aligned)."""
    _check_x(bound, x)
    tokens = x.shape[0]
    for t, name, shape, dtype in ((y, "y", (tokens, bound.hidden), bound.output_name),
                                  (ids, "topk_ids", (tokens, bound.top_k), "int32"),
                                  (weights, "topk_weights", (tokens, bound.top_k), "float32")):
        check_array(tensor_info(t, name), shape, dtype, bound.device_name, output=True)
    stream = _raw_stream(bound.device_index) if bound.is_cuda else 0
    bound.forward_raw(x.data_ptr(), y.data_ptr(), tokens, ids.data_ptr(), weights.data_ptr(), stream)


# ---------------------------------------------------------------------------------------------------------------------
# The op. Defined through torch.library.Library rather than the @custom_op decorator: the dispatcher then calls
# `_moe_forward_kernel` directly, which costs a few µs less per call (the decorator adds a Python autograd layer).

_lib_def = torch.library.Library("flashmoe", "DEF")
_lib_def.define("moe_forward(Tensor x, int layer) -> (Tensor, Tensor, Tensor)")


def _moe_forward_kernel(x: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One MoE layer forward: (y [S, H], topk_ids [S, k] int32, topk_weights [S, k] float32) for x [S, H]."""
    return run(lookup(layer), x)


for _key in ("CUDA", "CPU"):
    _lib_def.impl("moe_forward", _moe_forward_kernel, _key)


@torch.library.register_fake("flashmoe::moe_forward")
def _moe_forward_fake(x: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    bound = lookup(layer)
    if x.dim() != 2 or x.shape[1] != bound.hidden:
        raise ValueError(f"x must have shape [S, {bound.hidden}], got {list(x.shape)}")
    if x.dtype != bound.storage:
        raise TypeError(f"x must have dtype {bound.storage}, got {x.dtype}")
    if x.device != bound.device:
        raise ValueError(f"x must be on {bound.device} (the layer's device), got {x.device}")
    tokens = x.shape[0]
    return (x.new_empty((tokens, bound.hidden), dtype=bound.output),
            x.new_empty((tokens, bound.top_k), dtype=torch.int32),
            x.new_empty((tokens, bound.top_k), dtype=torch.float32))


# The out variant, for callers that keep their output buffers (no allocation per call): writes y, topk_ids and
# topk_weights, returns nothing.
_lib_def.define("moe_forward_out(Tensor x, int layer, Tensor(a!) y, Tensor(b!) topk_ids, Tensor(c!) topk_weights) "
                "-> ()")


def _moe_forward_out_kernel(x, layer, y, topk_ids, topk_weights) -> None:
    run_out(lookup(layer), x, y, topk_ids, topk_weights)


for _key in ("CUDA", "CPU"):
    _lib_def.impl("moe_forward_out", _moe_forward_out_kernel, _key)


@torch.library.register_fake("flashmoe::moe_forward_out")
def _moe_forward_out_fake(x, layer, y, topk_ids, topk_weights) -> None:
    _moe_forward_fake(x, layer)


#: The ops' default overloads (what torch.ops.flashmoe.moe_forward / moe_forward_out resolve to).
moe_forward = torch.ops.flashmoe.moe_forward.default
moe_forward_out = torch.ops.flashmoe.moe_forward_out.default
