"""The numpy front end: a CPU-backend layer over numpy arrays (no torch needed).

    import numpy as np, flashmoe
    cfg = flashmoe.MoEConfig(hidden=64, intermediate=32, experts=8, top_k=2, max_tokens=128)
    layer = flashmoe.Layer(cfg, {"router": r, "gate_up": w13, "down": w2})   # float32 arrays
    y, topk_ids, topk_weights = layer.forward(x)                               # x [S, 64] float32

numpy has no bfloat16: a bf16 layer (config.precision="bf16") takes its weights and x as uint16 arrays holding the
raw bfloat16 bits. An fp8 layer (config.precision="fp8") takes x, the router and the shared expert that way too, and
its routed experts' matrices either as bfloat16 bits (quantized at creation) or as E4M3 codes, uint8 arrays of the
float8_e4m3fn bits (or ml_dtypes.float8_e4m3fn arrays), with their float32 block scales (gate_up_scale or
gate_scale + up_scale, and down_scale). y and topk_weights are float32, topk_ids int32 (include/flashmoe.h, CPU
backend).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from . import _lib
from ._checks import SCALE_NAMES, ArrayInfo, check_forward
from .config import FP8_DTYPE, MoEConfig
from .native import NativeLayer

def array_info(a, name: str, *, storage_bf16: bool = False, fp8_bits: bool = False) -> ArrayInfo:
    """Describes a numpy array for the checks; anything else is a TypeError naming the argument. `storage_bf16`:
    uint16 means bfloat16 bits; `fp8_bits`: uint8 means float8_e4m3fn bits."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    dtype = a.dtype.name
    if dtype == "uint16" and storage_bf16:
        dtype = "bfloat16"
    elif dtype == "uint8" and fp8_bits:
        dtype = FP8_DTYPE
    return ArrayInfo(name, tuple(a.shape), dtype, bool(a.flags.c_contiguous), int(a.ctypes.data), "cpu",
                     bool(a.flags.writeable))


class Layer:
    """A FlashMoE layer on the CPU backend, fed with numpy arrays.

    `weights` maps include/flashmoe.h's field names (router, selection_bias, gate_up or gate + up, down, b1, b2,
    shared_gate_up, shared_up, shared_down, shared_gate) to C-contiguous arrays in the layer's storage dtype (biases
    and the selection bias float32). The library copies what it needs: the arrays may be freed afterwards.
    """

    def __init__(self, config: MoEConfig, weights: Mapping[str, np.ndarray]):
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a flashmoe.MoEConfig, got {type(config).__name__}")
        if not isinstance(weights, Mapping):
            raise TypeError(f"weights must be a mapping of names to numpy arrays, got {type(weights).__name__}")
        if "router" not in weights:
            raise ValueError("weights: missing 'router' [E, H]")
        config.validate()
        router = array_info(weights["router"], "weights['router']", storage_bf16=config.precision in ("bf16", "fp8"))
        down = weights.get("down")
        precision = config.resolved_precision(router.dtype, down.dtype.name if isinstance(down, np.ndarray) else None)
        bf16 = precision in ("bf16", "fp8")
        infos = {name: array_info(a, f"weights[{name!r}]", storage_bf16=bf16 and name not in _FLOAT32_WEIGHTS,
                                  fp8_bits=precision == "fp8" and name in _EXPERT_MATRICES)
                 for name, a in weights.items()}
        self._native = NativeLayer(config, infos, precision=precision, backend=_lib.BACKEND_CPU, device=0)
        self.config = config

    @property
    def precision(self) -> str:
        """The precision the layer runs in, e.g. "fp32" or "bf16"."""
        return self._native.precision

    def forward(self, x: np.ndarray, *, y: np.ndarray | None = None, topk_ids: np.ndarray | None = None,
                topk_weights: np.ndarray | None = None, routing: bool = True):
        """One forward over x [S, H]. Returns (y, topk_ids, topk_weights); the routing outputs are None with
        `routing=False`. Pass `y`, `topk_ids`, `topk_weights` to write into arrays of your own (float32 [S, H],
        int32 [S, k], float32 [S, k])."""
        n = self._native
        xi = array_info(x, "x", storage_bf16=n.storage_dtype == "bfloat16")
        if len(xi.shape) != 2:
            raise ValueError(f"x must have shape [S, {n.hidden}], got {list(xi.shape)}")
        tokens = xi.shape[0]
        if y is None:
            y = np.empty((tokens, n.hidden), dtype=np.float32)
        want_routing = routing or topk_ids is not None or topk_weights is not None
        if want_routing:
            if topk_ids is None:
                topk_ids = np.empty((tokens, n.top_k), dtype=np.int32)
            if topk_weights is None:
                topk_weights = np.empty((tokens, n.top_k), dtype=np.float32)
        outputs = [(array_info(y, "y"), (tokens, n.hidden), n.output_dtype)]
        if want_routing:
            outputs += [(array_info(topk_ids, "topk_ids"), (tokens, n.top_k), "int32"),
                        (array_info(topk_weights, "topk_weights"), (tokens, n.top_k), "float32")]
        check_forward(xi, outputs, hidden=n.hidden, max_tokens=n.max_tokens, storage=n.storage_dtype, device="cpu")
        n.forward_raw(xi.ptr, outputs[0][0].ptr, tokens, outputs[1][0].ptr if want_routing else 0,
                      outputs[2][0].ptr if want_routing else 0, 0)
        return (y, topk_ids, topk_weights) if want_routing else (y, None, None)

    def info(self) -> dict:
        """What the library holds for this layer (max_tokens, weight_bytes, workspace_bytes, backend, ...)."""
        return self._native.info()

    def close(self) -> None:
        """Frees the layer (idempotent); later calls raise ValueError."""
        self._native.close()

    def __enter__(self) -> "Layer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        native = getattr(self, "_native", None)
        if native is not None and not native.closed:
            try:
                native.close()
            except Exception:  # noqa: BLE001 - never raise from a finalizer
                pass

    def __repr__(self) -> str:
        return f"flashmoe.Layer({self._native!r})"


#: Weights the header stores in float32 whatever the precision.
_FLOAT32_WEIGHTS = ("selection_bias", "b1", "b2", *SCALE_NAMES)
#: The routed experts' matrices: E4M3 codes in an fp8 layer given block scales.
_EXPERT_MATRICES = ("gate_up", "gate", "up", "down")
