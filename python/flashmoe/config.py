"""`MoEConfig`: a layer's shape and options in Python terms, checked and turned into the C `flashmoe_config_t`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from . import _lib

#: Activation names (FlashMoE's and Hugging Face's `hidden_act` spellings) -> flashmoe_activation_t.
ACTIVATIONS = {
    "relu": _lib.ACT_RELU,
    "gelu": _lib.ACT_GELU,
    "gelu_tanh": _lib.ACT_GELU_TANH,
    "gelu-tanh": _lib.ACT_GELU_TANH,
    "gelu_new": _lib.ACT_GELU_TANH,
    "gelu_pytorch_tanh": _lib.ACT_GELU_TANH,
    "gelu_fast": _lib.ACT_GELU_TANH,
    "silu": _lib.ACT_SILU,
    "swish": _lib.ACT_SILU,
}
FFNS = {"plain": _lib.FFN_PLAIN, "gated": _lib.FFN_GATED}
ROUTERS = {"softmax": _lib.ROUTER_SOFTMAX, "sigmoid": _lib.ROUTER_SIGMOID}
PRECISIONS = {"fp32": _lib.PRECISION_FP32, "tf32": _lib.PRECISION_TF32, "bf16": _lib.PRECISION_BF16,
              "fp16": _lib.PRECISION_FP16, "fp8": _lib.PRECISION_FP8}
OUTPUTS = {"storage": _lib.OUTPUT_STORAGE, "float32": _lib.OUTPUT_FLOAT32}
#: The element type x and every weight matrix are stored in, per precision (dtype names as numpy and torch spell them).
#: fp8 stores x, the router and the shared expert in bfloat16; its routed experts' matrices are bfloat16 (quantized
#: when the layer is created) or E4M3 codes (FP8_DTYPE) with float32 block scales (the *_scale weights).
STORAGE_DTYPE = {"fp32": "float32", "tf32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp8": "bfloat16"}
#: The dtype name of E4M3 codes (torch.float8_e4m3fn; numpy: uint8 arrays of the bits, or ml_dtypes' type).
FP8_DTYPE = "float8_e4m3fn"
#: The precision a storage dtype implies when MoEConfig.precision is None (float32 -> fp32, never tf32).
PRECISION_OF_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@dataclass
class MoEConfig:
    """One MoE layer: y[t] = Σ_j w[t,j] · FFN_{e[t,j]}(x[t]) (+ the shared expert), as include/flashmoe.h defines it.

    Shapes: H = `hidden`, I = `intermediate`, E = `experts`, k = `top_k`. `precision=None` takes the precision from
    the weights' dtype (float32 -> fp32, bfloat16 -> bf16, float16 -> fp16; float8_e4m3fn expert matrices -> fp8);
    "tf32", and "fp8" with bfloat16 expert matrices (quantized at creation), must be asked for.
    `max_tokens` is the most rows one forward may pass: the workspace is sized for it once, at creation.
    """

    hidden: int
    intermediate: int
    experts: int
    top_k: int
    ffn: str = "gated"
    activation: str = "silu"
    #: plain FFN only: b1 [E, I] and b2 [E, H] are given
    bias: bool = False
    router: str = "softmax"
    renormalize: bool = True
    #: sigmoid router: expert groups and how many a token keeps (1 = no grouping)
    groups: int = 1
    groups_kept: int = 1
    #: multiplies the routing weights after renormalisation (DeepSeek-V3's routed_scaling_factor)
    scaling: float = 1.0
    #: the shared expert's I (0 = none); `shared_gated`: it has a sigmoid gate row [H] (Qwen2-MoE)
    shared_intermediate: int = 0
    shared_gated: bool = False
    #: 0 = dropless, else each expert keeps ceil(ceil(S/E) * k * factor) pairs
    capacity_factor: float = 0.0
    precision: str | None = None
    max_tokens: int = 4096
    #: GPU output dtype: "storage" (the precision's storage type) or "float32"; CPU layers always write float32
    output: str = "storage"
    #: debug: synchronise after every forward and raise kernel errors at once
    sync_errors: bool = False
    #: tests only: a kernel build that skips one publication, so a device wait times out
    inject_fault: bool = False
    #: budget of every device-side wait in ms (0 = the library's default, 5000)
    wait_budget_ms: int = 0
    #: bf16/fp16 layers and groups: the routed experts' output rows in the storage type, not float32 (a
    #: layer's rows before the combine, a group's rows sent back): half those bytes, one more rounding of each
    storage_returns: bool = False

    def replace(self, **changes) -> "MoEConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        """Raises ValueError/TypeError naming the first bad field and what it expects."""
        for name in ("hidden", "intermediate", "experts", "top_k", "groups", "groups_kept", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"config.{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"config.{name} must be >= 1, got {value}")
        if self.top_k > self.experts:
            raise ValueError(f"config.top_k ({self.top_k}) must be <= config.experts ({self.experts})")
        for name, table in (("ffn", FFNS), ("activation", ACTIVATIONS), ("router", ROUTERS), ("output", OUTPUTS)):
            value = getattr(self, name)
            if value not in table:
                raise ValueError(f"config.{name} must be one of {sorted(table)}, got {value!r}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"config.precision must be one of {sorted(PRECISIONS)} or None, got {self.precision!r}")
        if self.bias and self.ffn != "plain":
            raise ValueError("config.bias is for plain FFNs only (ffn='plain'); gated experts have no biases")
        if self.router == "sigmoid":
            if self.experts % self.groups:
                raise ValueError(f"config.groups ({self.groups}) must divide config.experts ({self.experts})")
            if self.groups_kept > self.groups:
                raise ValueError(f"config.groups_kept ({self.groups_kept}) must be <= config.groups ({self.groups})")
        elif self.groups != 1 or self.groups_kept != 1:
            raise ValueError("config.groups and config.groups_kept are for router='sigmoid' only; leave them at 1")
        if not (isinstance(self.scaling, (int, float)) and math.isfinite(self.scaling) and self.scaling > 0):
            raise ValueError(f"config.scaling must be a finite number > 0, got {self.scaling!r}")
        if isinstance(self.shared_intermediate, bool) or not isinstance(self.shared_intermediate, int) \
                or self.shared_intermediate < 0:
            raise ValueError(f"config.shared_intermediate must be an int >= 0, got {self.shared_intermediate!r}")
        if self.shared_gated and self.shared_intermediate == 0:
            raise ValueError("config.shared_gated needs a shared expert (config.shared_intermediate > 0)")
        if not (isinstance(self.capacity_factor, (int, float)) and math.isfinite(self.capacity_factor)
                and self.capacity_factor >= 0):
            raise ValueError(f"config.capacity_factor must be 0 (dropless) or > 0, got {self.capacity_factor!r}")
        if not isinstance(self.wait_budget_ms, int) or not 0 <= self.wait_budget_ms < 2**32:
            raise ValueError(f"config.wait_budget_ms must be an int in [0, 2^32), got {self.wait_budget_ms!r}")

    def resolved_precision(self, weight_dtype: str, expert_dtype: str | None = None) -> str:
        """The precision to use with a router of `weight_dtype` (a dtype name such as "bfloat16") and routed experts'
        matrices of `expert_dtype` (E4M3 codes imply fp8)."""
        if self.precision is not None:
            return self.precision
        if expert_dtype == FP8_DTYPE:
            return "fp8"
        if weight_dtype not in PRECISION_OF_DTYPE:
            raise TypeError(f"weights['router'] has dtype {weight_dtype}; FlashMoE stores weights as float32, "
                            f"bfloat16 or float16 (or set config.precision)")
        return PRECISION_OF_DTYPE[weight_dtype]

    def to_struct(self, *, precision: str, backend: int, device: int, selection_bias: bool) -> _lib.Config:
        """The C config (FLASHMOE_CONFIG_INIT, then every field set)."""
        self.validate()
        c = _lib.Config.init()
        c.hidden, c.intermediate, c.experts, c.top_k = self.hidden, self.intermediate, self.experts, self.top_k
        c.ffn, c.activation, c.bias = FFNS[self.ffn], ACTIVATIONS[self.activation], int(self.bias)
        c.router, c.renormalize = ROUTERS[self.router], int(self.renormalize)
        c.groups, c.groups_kept, c.selection_bias = self.groups, self.groups_kept, int(selection_bias)
        c.scaling = float(self.scaling)
        c.shared_intermediate, c.shared_gated = self.shared_intermediate, int(self.shared_gated)
        c.capacity_factor = float(self.capacity_factor)
        c.precision, c.backend, c.device = PRECISIONS[precision], backend, device
        c.output = OUTPUTS[self.output]
        c.max_tokens = self.max_tokens
        c.flags = ((_lib.FLAG_SYNC_ERRORS if self.sync_errors else 0)
                   | (_lib.FLAG_INJECT_FAULT if self.inject_fault else 0)
                   | (_lib.FLAG_STORAGE_RETURNS if self.storage_returns else 0))
        c.wait_budget_ms = self.wait_budget_ms
        return c
