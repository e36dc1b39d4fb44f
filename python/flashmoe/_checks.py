"""Argument checks shared by the numpy and torch front ends, run before any native call.

Arrays are described by `ArrayInfo` (shape, dtype name, contiguity, address, device), so one set of rules and one
wording of every message serves numpy arrays and torch tensors. Wrong types and dtypes raise TypeError; wrong shapes,
devices, layouts, alignment and sizes raise ValueError. Every message names the argument and says what it expects.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import _lib
from .config import FP8_DTYPE, STORAGE_DTYPE, MoEConfig

#: Every pointer the library reads or writes must be aligned to this many bytes (vector loads and stores).
ALIGNMENT = 16


@dataclass(frozen=True)
class ArrayInfo:
    """What the checks need to know about one array argument."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # "float32", "bfloat16", "float16", "int32", ...
    contiguous: bool
    ptr: int
    device: str  # "cpu" or "cuda:N"
    writable: bool = True


def check_array(a: ArrayInfo, shape: tuple[int, ...], dtype: str, device: str, *, output: bool = False) -> None:
    """One array against the expected shape, dtype and device; contiguity and 16-byte alignment."""
    if a.dtype != dtype:
        raise TypeError(f"{a.name} must have dtype {dtype}, got {a.dtype}")
    if a.shape != tuple(shape):
        raise ValueError(f"{a.name} must have shape {list(shape)}, got {list(a.shape)}")
    if a.device != device:
        raise ValueError(f"{a.name} must be on {device} (the layer's device), got {a.device}")
    if not a.contiguous:
        raise ValueError(f"{a.name} must be contiguous (row-major); pass a contiguous copy")
    if a.ptr % ALIGNMENT and _elements(a.shape):
        raise ValueError(f"{a.name} must be {ALIGNMENT}-byte aligned; its address is {a.ptr:#x} "
                         f"(a sliced view? pass a fresh copy)")
    if output and not a.writable:
        raise ValueError(f"{a.name} must be writable")


def _elements(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass(frozen=True)
class WeightSpec:
    """One weight the config needs: its shape and its dtype (None: the precision's storage type)."""

    shape: tuple[int, ...]
    float32: bool = False
    #: a dtype other than the storage type's or float32 (the E4M3 codes of fp8 expert matrices)
    dtype: str | None = None


#: The FP8 block-scale weights (float32, one scale per 128x128 block of each expert matrix; since 0.5).
SCALE_NAMES = ("gate_up_scale", "gate_scale", "up_scale", "down_scale")


def _blocks(n: int) -> int:
    return (n + 127) // 128


def weight_specs(config: MoEConfig, layout: int, selection_bias: bool,
                 local_experts: int | None = None, fp8_codes: bool = False) -> dict[str, WeightSpec]:
    """The weights a layer of `config` takes (include/flashmoe.h, flashmoe_weights_t), by field name.
    `local_experts`: the per-expert tensors hold only this many experts (a group rank's shard); the router and the
    selection bias always cover all E. `fp8_codes`: the routed experts' matrices are E4M3 codes with block scales."""
    h, i, s = config.hidden, config.intermediate, config.shared_intermediate
    e = config.experts if local_experts is None else local_experts
    gated = config.ffn == "gated"
    codes = FP8_DTYPE if fp8_codes else None
    specs = {"router": WeightSpec((config.experts, h)), "down": WeightSpec((e, h, i), dtype=codes)}
    if selection_bias:
        specs["selection_bias"] = WeightSpec((config.experts,), float32=True)
    rows = 2 * i if gated else i
    if layout == _lib.LAYOUT_FUSED:
        specs["gate_up"] = WeightSpec((e, rows, h), dtype=codes)
    else:
        specs["gate"] = WeightSpec((e, i, h), dtype=codes)
        if gated:
            specs["up"] = WeightSpec((e, i, h), dtype=codes)
    if fp8_codes:
        specs["down_scale"] = WeightSpec((e, _blocks(h), _blocks(i)), float32=True)
        if layout == _lib.LAYOUT_FUSED:
            specs["gate_up_scale"] = WeightSpec((e, _blocks(rows), _blocks(h)), float32=True)
        else:
            specs["gate_scale"] = WeightSpec((e, _blocks(i), _blocks(h)), float32=True)
            if gated:
                specs["up_scale"] = WeightSpec((e, _blocks(i), _blocks(h)), float32=True)
    if config.bias:
        specs["b1"] = WeightSpec((e, i), float32=True)
        specs["b2"] = WeightSpec((e, h), float32=True)
    if s:
        specs["shared_down"] = WeightSpec((h, s))
        if layout == _lib.LAYOUT_FUSED:
            specs["shared_gate_up"] = WeightSpec((2 * s if gated else s, h))
        else:
            specs["shared_gate_up"] = WeightSpec((s, h))
            if gated:
                specs["shared_up"] = WeightSpec((s, h))
        if config.shared_gated:
            specs["shared_gate"] = WeightSpec((h,))
    return specs


def layout_of(names: set[str]) -> int:
    """FUSED when `gate_up` is given, SEPARATE when `gate` is; both or neither is an error."""
    if "gate_up" in names and "gate" in names:
        raise ValueError("weights: give either 'gate_up' (fused [E, 2I, H]) or 'gate' and 'up' ([E, I, H] each), "
                         "not both")
    if "gate_up" in names:
        return _lib.LAYOUT_FUSED
    if "gate" in names:
        return _lib.LAYOUT_SEPARATE
    raise ValueError("weights: missing 'gate_up' (fused [E, 2I, H], or W1 [E, I, H] for plain FFNs) or 'gate' and "
                     "'up' ([E, I, H] each)")


def check_weights(config: MoEConfig, arrays: dict[str, ArrayInfo], precision: str, device: str,
                  local_experts: int | None = None) -> int:
    """Checks the weight arrays against the config; returns the layout. Unknown or superfluous names, missing ones,
    and any dtype, shape, device, contiguity or alignment problem raise, naming the weight. `local_experts`: see
    `weight_specs`."""
    unknown = sorted(set(arrays) - set(_lib.Weights.POINTERS))
    if unknown:
        raise ValueError(f"weights: unknown name(s) {unknown}; the names are {list(_lib.Weights.POINTERS)}")
    if "selection_bias" in arrays and config.router != "sigmoid":
        raise ValueError("weights['selection_bias'] is for router='sigmoid' only")
    layout = layout_of(set(arrays))
    scales = [name for name in SCALE_NAMES if name in arrays]
    if scales and precision != "fp8":
        raise ValueError(f"weights[{scales[0]!r}] is an FP8 block scale, for precision 'fp8' with float8_e4m3fn "
                         f"expert matrices; this layer's precision is {precision!r}")
    if scales and layout == _lib.LAYOUT_FUSED and config.ffn == "gated" and config.intermediate % 128:
        raise ValueError(f"weights['gate_up_scale']: with intermediate = {config.intermediate}, not a multiple of "
                         f"128, a 128-row scale block of gate_up would hold gate and up rows; pass 'gate', 'up', "
                         f"'gate_scale' and 'up_scale' instead")
    specs = weight_specs(config, layout, "selection_bias" in arrays, local_experts, fp8_codes=bool(scales))
    extra = sorted(set(arrays) - set(specs))
    if extra:
        raise ValueError(f"weights: {extra} not used by this config (ffn={config.ffn!r}, bias={config.bias}, "
                         f"shared_intermediate={config.shared_intermediate}, "
                         f"shared_gated={config.shared_gated}); remove them or change the config")
    missing = [name for name in specs if name not in arrays]
    if missing:
        more = " (float8_e4m3fn expert matrices need every block scale of the layout)" if scales else ""
        raise ValueError(f"weights: missing {missing} for this config{more}")
    storage = STORAGE_DTYPE[precision]
    for name, spec in specs.items():
        a = arrays[name]
        if precision == "fp8" and not scales and a.dtype == FP8_DTYPE:
            raise TypeError(f"weights[{name!r}] holds float8_e4m3fn codes but no block scales were given: pass "
                            f"the *_scale weights (float32 [E, ceil(rows/128), ceil(cols/128)]) or bfloat16 matrices")
        check_array(a, spec.shape, "float32" if spec.float32 else spec.dtype or storage, device)
    return layout


def check_forward(x: ArrayInfo, outputs: list[tuple[ArrayInfo, tuple[int, ...], str]], *, hidden: int,
                  max_tokens: int, storage: str, device: str) -> int:
    """Checks x [S, H] and the given outputs (array, expected shape, dtype); returns S."""
    if len(x.shape) != 2 or x.shape[1] != hidden:
        raise ValueError(f"x must have shape [S, {hidden}] (S tokens of the layer's hidden size), got {list(x.shape)}")
    tokens = x.shape[0]
    if tokens > max_tokens:
        raise ValueError(f"x has {tokens} tokens, more than the layer's max_tokens ({max_tokens}); create the layer "
                         f"with a larger max_tokens or split the batch")
    check_array(x, (tokens, hidden), storage, device)
    for array, shape, dtype in outputs:
        check_array(array, shape, dtype, device, output=True)
    return tokens
