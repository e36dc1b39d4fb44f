"""`NativeLayer`: one flashmoe_layer_t handle, created from checked weight addresses, with raw-pointer calls.

The numpy front end (`flashmoe.numpy_api.Layer`) and the torch one (`flashmoe.MoELayer`) both check their arrays and
then call this class; nothing here inspects arrays, so it never runs with unchecked pointers unless called directly.
"""

from __future__ import annotations

import ctypes
import threading

from . import _lib
from ._checks import ArrayInfo, check_weights
from .config import STORAGE_DTYPE, MoEConfig


class NativeLayer:
    """An open layer handle. `backend` is _lib.BACKEND_CPU or _lib.BACKEND_CUDA; `device` the CUDA ordinal (0 for
    CPU layers). Attributes describe what a forward takes and writes: `hidden`, `top_k`, `max_tokens`, `precision`,
    `storage_dtype` (x's dtype), `output_dtype` (y's dtype)."""

    def __init__(self, config: MoEConfig, weights: dict[str, ArrayInfo], *, precision: str, backend: int,
                 device: int):
        config.validate()
        where = "cpu" if backend == _lib.BACKEND_CPU else f"cuda:{device}"
        layout = check_weights(config, weights, precision, where)
        struct = config.to_struct(precision=precision, backend=backend, device=device,
                                  selection_bias="selection_bias" in weights)
        w = _lib.Weights.of(layout, {name: array.ptr for name, array in weights.items()})
        lib = _lib.lib()
        handle = ctypes.c_void_p()
        status = lib.flashmoe_layer_create(ctypes.byref(struct), ctypes.byref(w), ctypes.byref(handle))
        _lib.raise_for(status, "flashmoe_layer_create")
        if not handle.value:
            raise _lib.FlashMoEError(_lib.ERROR_INTERNAL, "flashmoe_layer_create succeeded but returned NULL",
                                     "flashmoe_layer_create")
        self.handle: int = handle.value
        self.config = config
        self.backend = backend
        self.device = device
        self.device_name = where
        self.hidden = config.hidden
        self.top_k = config.top_k
        self.max_tokens = config.max_tokens
        self.precision = precision
        self.storage_dtype = STORAGE_DTYPE[precision]
        self.output_dtype = (
            "float32" if backend == _lib.BACKEND_CPU or config.output == "float32" else self.storage_dtype)
        #: The ctypes function flashmoe_layer_forward (argtypes set), for callers that do their own checks.
        self.forward_function = lib.flashmoe_layer_forward
        self._close_lock = threading.Lock()

    @property
    def closed(self) -> bool:
        """Whether `close()` has freed the native layer (every later call raises ValueError)."""
        return self.handle == 0

    def _live(self) -> int:
        if not self.handle:
            raise ValueError("layer: this layer has been closed")
        return self.handle

    def forward_raw(self, x: int, y: int, tokens: int, topk_ids: int = 0, topk_weights: int = 0,
                    stream: int = 0) -> None:
        """flashmoe_layer_forward with addresses as ints (0 = NULL). The caller has checked every argument."""
        status = self.forward_function(self._live(), x, y, tokens, topk_ids, topk_weights, stream)
        if status:
            _lib.raise_for(status, "flashmoe_layer_forward")

    def check(self, synchronize: bool = False, stream: int = 0) -> None:
        """Raises FlashMoEKernelError for a kernel error an earlier forward recorded (flashmoe_layer_check)."""
        status = _lib.lib().flashmoe_layer_check(self._live(), int(bool(synchronize)), stream)
        _lib.raise_for(status, "flashmoe_layer_check")

    def info(self) -> dict:
        """flashmoe_layer_info as a dict: max_tokens, weight_bytes, workspace_bytes, backend, device, grid_blocks."""
        info = _lib.LayerInfo()
        info.size = ctypes.sizeof(info)
        status = _lib.lib().flashmoe_layer_info(self._live(), ctypes.byref(info))
        _lib.raise_for(status, "flashmoe_layer_info")
        return {name: getattr(info, name) for name, _ in _lib.LayerInfo._fields_ if name not in ("size", "reserved")}

    def close(self) -> None:
        """Destroys the handle (idempotent). For GPU layers the caller must have waited for the layer's work."""
        with self._close_lock:
            handle, self.handle = self.handle, 0
        if handle:
            _lib.raise_for(_lib.lib().flashmoe_layer_destroy(handle), "flashmoe_layer_destroy")

    def __repr__(self) -> str:
        c = self.config
        state = "closed" if self.closed else f"handle {self.handle:#x}"
        return (f"NativeLayer({self.device_name}, {self.precision}, H={c.hidden}, I={c.intermediate}, E={c.experts}, "
                f"k={c.top_k}, max_tokens={c.max_tokens}, {state})")
