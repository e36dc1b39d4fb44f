"""A float64 numpy reference of one MoE layer, written from include/flashmoe.h and the routing rules documented in
Sources/FlashMoE/Reference/Router.swift (ties to the lower index; ranks in selection order; the sigmoid router's
group score is the sum of a group's two best biased scores; capacity slots in (token, rank) order).

Also random weights and helpers shared by the tests (no torch needed).
"""

from __future__ import annotations

import math

import numpy as np

_ERF = np.frompyfunc(math.erf, 1, 1)


def activation(name: str, v: np.ndarray) -> np.ndarray:
    """FlashMoE's activations in float64."""
    if name == "relu":
        return np.maximum(v, 0.0)
    if name == "gelu":
        return 0.5 * v * (1.0 + _ERF(v / math.sqrt(2.0)).astype(np.float64))
    if name in ("gelu_tanh", "gelu-tanh", "gelu_new", "gelu_pytorch_tanh"):
        c = math.sqrt(2.0 / math.pi)
        return 0.5 * v * (1.0 + np.tanh(c * (v + 0.044715 * v**3)))
    if name in ("silu", "swish"):
        return v / (1.0 + np.exp(-v))
    raise ValueError(name)


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, largest first, ties to the lower index."""
    return np.argsort(-scores, kind="stable")[:k]


def route(cfg, logits: np.ndarray, selection_bias: np.ndarray | None):
    """(ids [S, k] int, weights [S, k] float64) for router logits [S, E]."""
    s, e = logits.shape
    k = cfg.top_k
    ids = np.zeros((s, k), dtype=np.int64)
    weights = np.zeros((s, k))
    for t in range(s):
        l = logits[t]
        if cfg.router == "softmax":
            p = np.exp(l - l.max())
            p /= p.sum()
            chosen = _top(l, k)
            w = p[chosen]
            if cfg.renormalize and w.sum() > 0:
                w = w / w.sum()
        else:
            sig = 1.0 / (1.0 + np.exp(-l))
            choice = sig + (selection_bias if selection_bias is not None else 0.0)
            if cfg.groups > 1:
                size = e // cfg.groups
                groups = choice.reshape(cfg.groups, size)
                group_scores = np.array([np.sort(g)[::-1][: min(2, size)].sum() for g in groups])
                kept = _top(group_scores, cfg.groups_kept)
                mask = np.full(e, -np.inf)
                for g in kept:
                    mask[g * size:(g + 1) * size] = 0.0
                choice = choice + mask
            chosen = _top(choice, k)
            w = sig[chosen]
            if cfg.renormalize:
                w = w / (w.sum() + 1e-20)
        ids[t] = chosen
        weights[t] = w * cfg.scaling
    return ids, weights


def capacity(cfg, tokens: int) -> int | None:
    """Pairs each expert keeps (None = dropless)."""
    if not cfg.capacity_factor:
        return None
    base = (tokens + cfg.experts - 1) // cfg.experts
    return int(math.ceil(base * cfg.top_k * cfg.capacity_factor))


def moe_reference(cfg, weights: dict, x: np.ndarray):
    """(y [S, H], ids [S, k], weights [S, k]) in float64. `weights` uses the header's names, any layout."""
    w = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    x = np.asarray(x, dtype=np.float64)
    s = x.shape[0]
    i = cfg.intermediate
    gated = cfg.ffn == "gated"
    if "gate_up" in w:
        w1 = w["gate_up"][:, :i] if gated else w["gate_up"]
        w3 = w["gate_up"][:, i:] if gated else None
    else:
        w1, w3 = w["gate"], w.get("up")
    ids, rw = route(cfg, x @ w["router"].T, w.get("selection_bias"))
    y = np.zeros((s, cfg.hidden))
    cap = capacity(cfg, s)
    load = np.zeros(cfg.experts, dtype=np.int64)
    for t in range(s):
        for j in range(cfg.top_k):
            e = ids[t, j]
            slot = load[e]
            load[e] += 1
            if cap is not None and slot >= cap:
                continue
            if gated:
                hid = activation(cfg.activation, w1[e] @ x[t]) * (w3[e] @ x[t])
                out = w["down"][e] @ hid
            else:
                hid = activation(cfg.activation, w1[e] @ x[t] + (w["b1"][e] if cfg.bias else 0.0))
                out = w["down"][e] @ hid + (w["b2"][e] if cfg.bias else 0.0)
            y[t] += rw[t, j] * out
    if cfg.shared_intermediate:
        si = cfg.shared_intermediate
        if "shared_up" in w:
            sw1, sw3 = w["shared_gate_up"], w["shared_up"]
        else:
            sw1 = w["shared_gate_up"][:si] if gated else w["shared_gate_up"]
            sw3 = w["shared_gate_up"][si:] if gated else None
        hid = activation(cfg.activation, x @ sw1.T)
        if gated:
            hid = hid * (x @ sw3.T)
        shared = hid @ w["shared_down"].T
        if cfg.shared_gated:
            shared = shared / (1.0 + np.exp(-(x @ w["shared_gate"])))[:, None]
        y += shared
    return y, ids, rw


def random_weights(cfg, rng: np.random.Generator, *, layout: str = "fused", selection_bias: bool = False,
                   dtype=np.float32) -> dict:
    """Weights like nn.Linear's init (uniform in ±1/sqrt(fan_in)) in `dtype`; biases and selection bias float32."""
    h, i, e, si = cfg.hidden, cfg.intermediate, cfg.experts, cfg.shared_intermediate
    gated = cfg.ffn == "gated"

    def u(*shape):
        return (rng.uniform(-1, 1, size=shape) / math.sqrt(shape[-1])).astype(dtype)

    w = {"router": u(e, h), "down": u(e, h, i)}
    if layout == "fused":
        w["gate_up"] = u(e, 2 * i if gated else i, h)
    else:
        w["gate"] = u(e, i, h)
        if gated:
            w["up"] = u(e, i, h)
    if selection_bias:
        w["selection_bias"] = rng.uniform(-0.1, 0.1, size=e).astype(np.float32)
    if cfg.bias:
        w["b1"] = rng.uniform(-0.1, 0.1, size=(e, i)).astype(np.float32)
        w["b2"] = rng.uniform(-0.1, 0.1, size=(e, h)).astype(np.float32)
    if si:
        w["shared_down"] = u(h, si)
        if layout == "fused":
            w["shared_gate_up"] = u(2 * si if gated else si, h)
        else:
            w["shared_gate_up"] = u(si, h)
            if gated:
                w["shared_up"] = u(si, h)
        if cfg.shared_gated:
            w["shared_gate"] = u(h)
    return w


def relative_error(y, ref) -> float:
    """‖y − ref‖ / ‖ref‖ (1 when ref is 0)."""
    y, ref = np.asarray(y, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    denom = np.linalg.norm(ref)
    return float(np.linalg.norm(y - ref) / (denom if denom > 0 else 1.0))


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (round to nearest even) as uint16."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def from_bf16_bits(a: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32."""
    return (a.astype(np.uint32) << 16).view(np.float32)


def to_e4m3_bits(v: np.ndarray) -> np.ndarray:
    """float32 -> float8_e4m3fn bits (uint8): round to nearest even, saturating at ±448 (finite inputs), as
    docs/fp8.md defines the library's rounding."""
    v = np.asarray(v, dtype=np.float32)
    a = np.abs(v)
    sign = np.where(np.signbit(v), 0x80, 0).astype(np.uint8)
    _, e = np.frexp(a)  # a = m·2^e, m in [0.5, 1)
    e = np.maximum(e - 1, -6)  # a = f·2^e, f in [1, 2) for normals; subnormals share 2^-6's spacing
    r = np.rint(np.ldexp(a, 3 - e).astype(np.float64)).astype(np.int64)  # 8·f rounded (exact: a power-of-two scale)
    carry = r == 16
    r, e = np.where(carry, 8, r), np.where(carry, e + 1, e)
    normal = r >= 8
    code = np.where(normal, ((e + 7) << 3) | (r - 8), r)  # a subnormal's r is its code (m·2^-9, m = r)
    code = np.where(a >= 448, 0x7E, code)
    return (sign | code.astype(np.uint8)).astype(np.uint8)


def from_e4m3_bits(c: np.ndarray) -> np.ndarray:
    """float8_e4m3fn bits (uint8, no NaN codes) -> float32."""
    c = np.asarray(c, dtype=np.uint8)
    e, m = ((c >> 3) & 0xF).astype(np.int64), (c & 7).astype(np.float64)
    mag = np.where(e == 0, m * 2.0 ** -9, (8 + m) * np.exp2(e - 10.0))
    return np.where(c & 0x80, -mag, mag).astype(np.float32)


def quantize_blocks(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Matrices [..., R, C] quantized as the library does (docs/fp8.md): per 128×128 block, scale = amax / 448 in
    float32 (1 when 0), code = value / scale rounded to E4M3. Returns (codes uint8, scales float32
    [..., ceil(R/128), ceil(C/128)], dequantized float32 = code · scale)."""
    v = np.asarray(values, dtype=np.float32)
    *lead, rows, cols = v.shape
    br, bc = -(-rows // 128), -(-cols // 128)
    scales = np.ones((*lead, br, bc), np.float32)
    codes = np.zeros(v.shape, np.uint8)
    for bi in range(br):
        for bj in range(bc):
            block = v[..., bi * 128:(bi + 1) * 128, bj * 128:(bj + 1) * 128]
            s = (np.abs(block).max(axis=(-2, -1)) / np.float32(448)).astype(np.float32)
            s = np.where(s > 0, s, np.float32(1)).astype(np.float32)
            scales[..., bi, bj] = s
            codes[..., bi * 128:(bi + 1) * 128, bj * 128:(bj + 1) * 128] = to_e4m3_bits(block / s[..., None, None])
    index = (np.arange(rows) // 128)[:, None], (np.arange(cols) // 128)[None, :]
    dequantized = from_e4m3_bits(codes) * scales[..., index[0], index[1]]
    return codes, scales, dequantized.astype(np.float32)


def blocky(rng: np.random.Generator, shape, fan_in: int | None = None) -> np.ndarray:
    """bf16-representable float32 values [..., rows, cols], uniform in ±1/sqrt(fan_in) (default: cols), each
    128×128 block of each matrix scaled by its own power of two in 2^-4 … 2^3: FP8 tests' weights, whose block
    scales all differ, so a scale read from the wrong block, matrix or expert changes the result."""
    *lead, rows, cols = shape
    factor = np.exp2(rng.integers(-4, 4, size=(*lead, -(-rows // 128), -(-cols // 128)))).astype(np.float32)
    v = rng.uniform(-1, 1, size=shape).astype(np.float32) / np.float32(np.sqrt(fan_in or cols))
    v *= np.repeat(np.repeat(factor, 128, axis=-2)[..., :rows, :], 128, axis=-1)[..., :cols]
    return from_bf16_bits(to_bf16_bits(v))
