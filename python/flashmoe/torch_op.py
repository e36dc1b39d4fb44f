"""The `flashmoe::moe_forward` custom op and the checked torch call under it.

    y, topk_ids, topk_weights = torch.ops.flashmoe.moe_forward(x, layer_id)

`x` [S, H] in the layer's storage dtype on the layer's device; `layer_id` is the int a `flashmoe.MoELayer` registers
its native layer under (`MoELayer.layer_id`). The op is functional: it returns fresh tensors y [S, H] (the layer's
output dtype), topk_ids [S, k] int32 and topk_weights [S, k] float32 and mutates nothing. On CUDA it enqueues one
kernel launch on `torch.cuda.current_stream(x.device)` and returns (capturable in a CUDA graph); on the CPU it runs
the CPU backend before returning. The fake implementation gives `torch.compile(fullgraph=True)` the output metadata
from the registered layer, so the op traces without a graph break. There is no backward (inference only).

    torch.ops.flashmoe.moe_forward_out(x, layer_id, y, topk_ids, topk_weights)

is the same call into outputs the caller keeps (checked like x), for loops that should not allocate, and

    y = torch.ops.flashmoe.moe_forward_y(x, layer_id)

returns y alone (the routing stays in the library's workspace): one allocation per call instead of three.

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
    """A NativeLayer with what the hot path needs precomputed (torch dtypes, device, the ctypes entry point), so a
    call does no lookups beyond the registry's."""

    __slots__ = ("native", "hidden", "top_k", "max_tokens", "storage", "output", "device", "device_index",
                 "is_cuda", "call", "storage_name", "output_name", "device_name")

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
        self.call = native.forward_function  # flashmoe_layer_forward (ctypes, argtypes set)

    def forward(self, x: int, y: int, tokens: int, ids: int, weights: int) -> None:
        """flashmoe_layer_forward on the current stream of the layer's device (0 for CPU layers). The handle is read
        on every call, so a layer closed behind the registry's back raises ValueError instead of being called."""
        handle = self.native.handle
        if not handle:
            self.native._live()  # raises the closed layer's ValueError
        status = self.call(handle, x, y, tokens, ids, weights,
                           _raw_stream(self.device_index) if self.is_cuda else 0)
        if status:
            _lib.raise_for(status, "flashmoe_layer_forward")


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


def _accept_x(bound: BoundLayer, x) -> tuple[int, int]:
    """(S, x's address) for an x that passes every rule of `check_forward`; anything else goes to `_explain`, which
    raises the rule's own error. One expression per rule, shape read once: this runs on every call."""
    if isinstance(x, torch.Tensor) and x.dtype == bound.storage and x.device == bound.device and x.is_contiguous():
        shape = x.shape
        if len(shape) == 2 and shape[1] == bound.hidden and shape[0] <= bound.max_tokens:
            ptr = x.data_ptr()
            if ptr % ALIGNMENT == 0 or shape[0] == 0:  # H >= 1 (MoEConfig.validate): no elements iff S == 0
                return shape[0], ptr
    _explain(bound, x)
    raise AssertionError("unreachable")  # _explain always raises


def _accept_out(t, name: str, rows: int, cols: int, dtype: torch.dtype, dtype_name: str, bound: BoundLayer) -> int:
    """An output's address when it is a contiguous, aligned [rows, cols] tensor of `dtype` on the layer's device;
    else the precise error of `check_array`, naming `name`."""
    if isinstance(t, torch.Tensor) and t.dtype == dtype and t.device == bound.device and t.is_contiguous():
        shape = t.shape
        if len(shape) == 2 and shape[0] == rows and shape[1] == cols:
            ptr = t.data_ptr()
            if ptr % ALIGNMENT == 0 or rows == 0 or cols == 0:
                return ptr
    check_array(tensor_info(t, name), (rows, cols), dtype_name, bound.device_name, output=True)
    raise AssertionError("unreachable")  # check_array raised


def run(bound: BoundLayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checks x, allocates the outputs and calls the library (on the current stream of x's device for CUDA)."""
    tokens, xp = _accept_x(bound, x)
    device = bound.device
    # torch.empty(rows, cols, ...) parses faster than torch.empty((rows, cols), ...).
    y = torch.empty(tokens, bound.hidden, dtype=bound.output, device=device)
    ids = torch.empty(tokens, bound.top_k, dtype=torch.int32, device=device)
    weights = torch.empty(tokens, bound.top_k, dtype=torch.float32, device=device)
    bound.forward(xp, y.data_ptr(), tokens, ids.data_ptr(), weights.data_ptr())
    return y, ids, weights


def run_y(bound: BoundLayer, x: torch.Tensor) -> torch.Tensor:
    """Like `run` without the routing outputs (the library keeps them in its workspace): one allocation."""
    tokens, xp = _accept_x(bound, x)
    y = torch.empty(tokens, bound.hidden, dtype=bound.output, device=bound.device)
    bound.forward(xp, y.data_ptr(), tokens, 0, 0)
    return y


def run_out(bound: BoundLayer, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> None:
    """Like `run`, into the caller's outputs (checked: dtype, shape, device, contiguous, aligned)."""
    tokens, xp = _accept_x(bound, x)
    k = bound.top_k
    yp = _accept_out(y, "y", tokens, bound.hidden, bound.output, bound.output_name, bound)
    ip = _accept_out(ids, "topk_ids", tokens, k, torch.int32, "int32", bound)
    wp = _accept_out(weights, "topk_weights", tokens, k, torch.float32, "float32", bound)
    bound.forward(xp, yp, tokens, ip, wp)


# ---------------------------------------------------------------------------------------------------------------------
# The op. Defined through torch.library.Library rather than the @custom_op decorator: the dispatcher then calls
# `_moe_forward_kernel` directly, which costs a few µs less per call (the decorator adds a Python autograd layer).

_lib_def = torch.library.Library("flashmoe", "DEF")
_lib_def.define("moe_forward(Tensor x, int layer) -> (Tensor, Tensor, Tensor)")


def _moe_forward_kernel(x: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One MoE layer forward: (y [S, H], topk_ids [S, k] int32, topk_weights [S, k] float32) for x [S, H]."""
    bound = _registry.get(layer)  # lookup() inlined: this is the hot path
    return run(bound if bound is not None else lookup(layer), x)


for _key in ("CUDA", "CPU"):
    _lib_def.impl("moe_forward", _moe_forward_kernel, _key)


def _fake_bound(x: torch.Tensor, layer: int) -> BoundLayer:
    """The layer, after the checks a fake (meta) tensor allows: shape, dtype, device."""
    bound = lookup(layer)
    if x.dim() != 2 or x.shape[1] != bound.hidden:
        raise ValueError(f"x must have shape [S, {bound.hidden}], got {list(x.shape)}")
    if x.dtype != bound.storage:
        raise TypeError(f"x must have dtype {bound.storage}, got {x.dtype}")
    if x.device != bound.device:
        raise ValueError(f"x must be on {bound.device} (the layer's device), got {x.device}")
    return bound


@torch.library.register_fake("flashmoe::moe_forward")
def _moe_forward_fake(x: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    bound = _fake_bound(x, layer)
    tokens = x.shape[0]
    return (x.new_empty((tokens, bound.hidden), dtype=bound.output),
            x.new_empty((tokens, bound.top_k), dtype=torch.int32),
            x.new_empty((tokens, bound.top_k), dtype=torch.float32))


# The variant without the routing outputs, for callers that want y only (MoELayer without return_routing): one
# output allocation per call instead of three. y is the same as moe_forward's.
_lib_def.define("moe_forward_y(Tensor x, int layer) -> Tensor")


def _moe_forward_y_kernel(x: torch.Tensor, layer: int) -> torch.Tensor:
    """y [S, H] of one MoE layer forward for x [S, H]."""
    bound = _registry.get(layer)
    return run_y(bound if bound is not None else lookup(layer), x)


for _key in ("CUDA", "CPU"):
    _lib_def.impl("moe_forward_y", _moe_forward_y_kernel, _key)


@torch.library.register_fake("flashmoe::moe_forward_y")
def _moe_forward_y_fake(x: torch.Tensor, layer: int) -> torch.Tensor:
    bound = _fake_bound(x, layer)
    return x.new_empty((x.shape[0], bound.hidden), dtype=bound.output)


# The out variant, for callers that keep their output buffers (no allocation per call): writes y, topk_ids and
# topk_weights, returns nothing.
_lib_def.define("moe_forward_out(Tensor x, int layer, Tensor(a!) y, Tensor(b!) topk_ids, Tensor(c!) topk_weights) "
                "-> ()")


def _moe_forward_out_kernel(x, layer, y, topk_ids, topk_weights) -> None:
    bound = _registry.get(layer)
    run_out(bound if bound is not None else lookup(layer), x, y, topk_ids, topk_weights)


for _key in ("CUDA", "CPU"):
    _lib_def.impl("moe_forward_out", _moe_forward_out_kernel, _key)


@torch.library.register_fake("flashmoe::moe_forward_out")
def _moe_forward_out_fake(x, layer, y, topk_ids, topk_weights) -> None:
    # The outputs' rules that need no address (dtype, shape, device, contiguity), with check_array's messages. This
    # also runs for a call whose outputs are on the meta device while x is not (the dispatcher picks Meta).
    bound = _fake_bound(x, layer)
    tokens, k = x.shape[0], bound.top_k
    for t, name, shape, dtype in ((y, "y", (tokens, bound.hidden), bound.output_name),
                                  (topk_ids, "topk_ids", (tokens, k), "int32"),
                                  (topk_weights, "topk_weights", (tokens, k), "float32")):
        info = ArrayInfo(name, tuple(t.shape), str(t.dtype).removeprefix("torch."), t.is_contiguous(), 0, str(t.device))
        check_array(info, shape, dtype, bound.device_name, output=True)


#: The ops' default overloads (what torch.ops.flashmoe.moe_forward / moe_forward_y / moe_forward_out resolve to).
moe_forward = torch.ops.flashmoe.moe_forward.default
moe_forward_y = torch.ops.flashmoe.moe_forward_y.default
moe_forward_out = torch.ops.flashmoe.moe_forward_out.default
