"""The fp8 case of scripts/check_transformers.py (`--precisions fp8`; what it checks, against what and within which
limits is that script's docstring). It holds:

  * FlashMoE's FP8 rules in plain Python, no torch (docs/fp8.md): E4M3 decoding and rounding, the block and
    activation-group scales, which tensors the hub's FP8 format stores in E4M3 and its quantization_config, the
    sizes the FP8 model needs and the comparisons' limits;
  * the same rules with torch, held to the plain ones by `check_torch_fp8_rules` (at run time and in the tests):
    block quantization of weights, fake quantization of activations, and the writer of the FP8 checkpoint and its
    exactly dequantized twin;
  * the references: the float64 block with FP8 arithmetic emulated as FlashMoE and as transformers compute it,
    transformers' own FP8 layers (with `torch_standin_kernels` standing in for its Hub kernel where that cannot be
    had) and its dequantizing loader;
  * `run_fp8_family`, which does one family's case and returns its table rows.

check_transformers.py imports it (never the reverse); both use scripts/transformers_common.py. Imported, never run;
torch, transformers and safetensors are imported inside the functions, so importing it needs none of them.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import struct
import sys
import types

# transformers_common sits beside this file: put its folder on sys.path where an importer has not.
if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from transformers_common import (TOKENS, build_model, describe_layout, first_line, moe_block,  # noqa: E402
                                 relative_error, run_block, run_cli, stacked_weights, worst_token)

#: The families with published block-scaled FP8 checkpoints (DeepSeek-V3, Qwen3-*-FP8): the fp8 cases.
FP8_FAMILIES = ("qwen3_moe", "deepseek_v3")
#: The tiny FP8 model: H and I multiples of 128 (transformers' act_quant needs K % 128 == 0 in both GEMMs, and its
#: fused gate_up_proj_scale_inv stacks the gate's and the up's block rows, which only line up when I % 128 == 0);
#: I != H so the scale grids of w1 [3, 2] and w2 [2, 3] are not square (a transposed grid fails by shape).
FP8_SIZES = dict(hidden=256, inter=384, shared=384, experts=8, top_k=2)
#: Weight block edge and activation group width of the FP8 format (`weight_block_size` [128, 128]).
FP8_BLOCK = 128
#: The largest finite E4M3 value.
E4M3_MAX = 448.0
#: FlashMoE's fp8 tolerance against its fp8 oracle on the CPU backends (Precision.fp8.tolerance)...
FP8_LIMIT_CPU = 5e-3
#: ...and on the GPU's tensor cores (Precision.fp8.tolerance(for: .tensorCores)): the FP8 MMA truncates block sums.
FP8_LIMIT_GPU = 5e-2
#: Default --fp8-tolerance: comparisons whose two sides quantize activations differently or not at all; E4M3's own
#: relative step is 1/8 (1/16 rounding), and docs/fp8.md holds E4M3's whole error (weights too) to 8 %.
FP8_LIMIT_E4M3 = 8e-2
#: Magnitude factors of the FP8 weight blocks and activation groups: 2**uniform(-x, x).
FP8_BLOCK_SPREAD = 1.5


# ---------------------------------------------------------------------------------------------------------------
# FP8: the rules as plain Python (no torch; the unit tests and the run-time self-check hold torch to them)
# ---------------------------------------------------------------------------------------------------------------


def f32(value: float) -> float:
    """`value` rounded to the nearest float32 (ties to even), as a Python float."""
    return struct.unpack("<f", struct.pack("<f", value))[0]


def e4m3_value(code: int) -> float:
    """The value of E4M3 code `code` (0-255; float8_e4m3fn: bias 7, no infinities, NaN only at S.1111.111)."""
    sign = -1.0 if code & 0x80 else 1.0
    exponent, mantissa = (code >> 3) & 0x0F, code & 0x07
    if exponent == 15 and mantissa == 7:
        return math.nan
    if exponent == 0:
        return sign * mantissa * 2.0 ** -9
    return sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7)


def e4m3_round(value: float) -> float:
    """`value` (a float32) rounded to E4M3 as FlashMoE does it (`FP8E4M3(saturating:)`, docs/fp8.md): to nearest,
    ties to even, subnormals included; magnitudes that round above 448 (and +-inf) become +-448; NaN stays NaN."""
    if math.isnan(value):
        return math.nan
    sign = math.copysign(1.0, value)
    a = abs(value)
    if a >= E4M3_MAX:
        return sign * E4M3_MAX
    if a < 2.0 ** -6:  # subnormal spacing 2^-9; a * 512 is exact
        return sign * round(a * 512) / 512
    _, exponent = math.frexp(a)  # a = m * 2**exponent, m in [0.5, 1)
    step = 2.0 ** (exponent - 1 - 3)  # 3 fraction bits
    return sign * min(round(a / step) * step, E4M3_MAX)  # round(): ties to even; a / step is exact


def fp8_scale(amax: float) -> float:
    """The scale of a weight block or activation group whose largest finite magnitude is `amax`: amax / 448
    rounded to float32, or 1 when that is 0 (FP8Scaling.scale(amax:); DeepSeek's act_quant)."""
    s = f32(f32(amax) / E4M3_MAX)
    return s if s > 0 else 1.0


def fp8_scale_shape(shape) -> list[int]:
    """The shape of `<name>_scale_inv` for an FP8 weight of `shape` [..., rows, cols]: [..., ceil(rows/128),
    ceil(cols/128)] (FP8Blocks.scaleShape)."""
    shape = list(shape)
    if len(shape) < 2:
        raise ValueError(f"an FP8 weight is a matrix (or a stack of them), not shape {shape}")
    return shape[:-2] + [-(-shape[-2] // FP8_BLOCK), -(-shape[-1] // FP8_BLOCK)]


def quantize_blocks_reference(matrix: list[list[float]]) -> tuple[list[list[float]], list[list[float]]]:
    """Quantizes a matrix (rows of float32 values) block by block: (the E4M3 values of its codes, its scales
    [ceil(rows/128)][ceil(cols/128)]). The definition `quantize_fp8_blocks` must match (checked at run time)."""
    rows, cols = len(matrix), len(matrix[0]) if matrix else 0
    br, bc = fp8_scale_shape([rows, cols])
    scales = [[1.0] * bc for _ in range(br)]
    codes = [[0.0] * cols for _ in range(rows)]
    for bi in range(br):
        for bj in range(bc):
            rr = range(bi * FP8_BLOCK, min(rows, (bi + 1) * FP8_BLOCK))
            cc = range(bj * FP8_BLOCK, min(cols, (bj + 1) * FP8_BLOCK))
            amax = max((abs(matrix[r][c]) for r in rr for c in cc if math.isfinite(matrix[r][c])), default=0.0)
            s = scales[bi][bj] = fp8_scale(amax)
            for r in rr:
                for c in cc:
                    codes[r][c] = e4m3_round(f32(matrix[r][c] / s))
    return codes, scales


def fake_quantize_row_reference(row: list[float]) -> list[float]:
    """An activation row as FP8 sees it: per group of 128 channels, code x scale (FP8Scaling.fakeQuantizeRow, in
    Float64 rather than rounded to float32)."""
    out = []
    for start in range(0, len(row), FP8_BLOCK):
        group = row[start:start + FP8_BLOCK]
        s = fp8_scale(max((abs(v) for v in group if math.isfinite(v)), default=0.0))
        out += [e4m3_round(f32(v / s)) * s for v in group]
    return out


def fp8_quantized(name: str, ndim: int) -> bool:
    """Whether the hub's FP8 format stores tensor `name` in E4M3 (with `<name>_scale_inv`): every linear layer's
    weight matrix except the router (`…mlp.gate`), the embeddings, lm_head and Qwen2-MoE's shared-expert gate."""
    if ndim != 2 or not name.endswith(".weight"):
        return False
    module = name[: -len(".weight")].rsplit(".", 1)[-1]
    return module not in ("gate", "lm_head", "embed_tokens", "shared_expert_gate") and "norm" not in module


def fp8_quantization_config(family: str, moe_layers: list[int]) -> dict:
    """config.json's quantization_config as the hub's FP8 releases write it: DeepSeek-V3's (with fmt, no skip list)
    or Qwen3-*-FP8's (no fmt; modules_to_not_convert lists lm_head and every MoE layer's router)."""
    config = {"activation_scheme": "dynamic", "quant_method": "fp8", "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    if family == "qwen3_moe":
        config["modules_to_not_convert"] = ["lm_head"] + [f"model.layers.{n}.mlp.gate" for n in moe_layers]
    else:
        config["fmt"] = "e4m3"
    return config


def check_fp8_sizes(sizes: dict) -> None:
    """Raises ValueError unless the FP8 model's H, I and shared I are multiples of 128 (see FP8_SIZES)."""
    for key in ("hidden", "inter", "shared"):
        if sizes[key] % FP8_BLOCK:
            raise ValueError(f"FP8 sizes: {key} = {sizes[key]} is not a multiple of {FP8_BLOCK}: transformers' "
                             f"activation quantization needs K % 128 == 0 and its fused gate_up scales "
                             f"need I % 128 == 0")


def fp8_limit(kind: str, backend: str | None, loose: float, tight: float) -> float:
    """The relative-error limit of an fp8 comparison. kind: 'emulated' (FlashMoE against the emulation of its own
    arithmetic: 5e-3 on the CPU backends, 5e-2 where the GPU may compute, i.e. cuda and auto), 'cuda-vs-cpu' and
    'transformers-emulated' (5e-2: both sides on FP8 tensor cores or one of them), 'dequantized' and 'transformers'
    (`loose`, --fp8-tolerance: the two sides quantize activations differently or not at all),
    'transformers-dequantized' (`tight`, --tolerance: the same float64 arithmetic on the same weights)."""
    if kind == "emulated":
        return FP8_LIMIT_GPU if backend in ("cuda", "auto") else FP8_LIMIT_CPU
    if kind in ("cuda-vs-cpu", "transformers-emulated"):
        return FP8_LIMIT_GPU
    if kind in ("dequantized", "transformers"):
        return loose
    if kind == "transformers-dequantized":
        return tight
    raise ValueError(f"unknown fp8 comparison {kind}")


# ---------------------------------------------------------------------------------------------------------------
# FP8 with torch
# ---------------------------------------------------------------------------------------------------------------


class Skip(Exception):
    """A reference this run cannot compute (say why); its comparisons are reported as SKIP, not as failures.
    `stage`: 'load' (the model could not be had) or 'forward' (it loaded but its FP8 forward failed)."""

    def __init__(self, reason: str, stage: str = "load"):
        super().__init__(reason)
        self.stage = stage


def quantize_fp8_blocks(weight):
    """(codes float8_e4m3fn, scale_inv float32 [..., ceil(rows/128), ceil(cols/128)]) of a weight [..., rows, cols]
    by the rules of `quantize_blocks_reference` (on the CPU; torch rounds float32 to E4M3 to nearest even, and the
    clamp to +-448 keeps it from its NaN above 464)."""
    import torch

    w = weight.detach().to("cpu", torch.float32)
    *lead, rows, cols = w.shape
    br, bc = fp8_scale_shape(w.shape)[-2:]
    padded = torch.nn.functional.pad(w, (0, bc * FP8_BLOCK - cols, 0, br * FP8_BLOCK - rows))
    blocks = padded.reshape(*lead, br, FP8_BLOCK, bc, FP8_BLOCK)
    finite = torch.where(torch.isfinite(blocks), blocks.abs(), torch.zeros_like(blocks))
    amax = finite.amax(dim=(-3, -1))
    scale = amax / torch.full_like(amax, E4M3_MAX)  # an IEEE float32 division (a scalar divisor may become a product)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (blocks / scale[..., :, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    codes = q.reshape(*lead, br * FP8_BLOCK, bc * FP8_BLOCK)[..., :rows, :cols].contiguous()
    return codes, scale.contiguous()


def dequantize_fp8_blocks(codes, scale_inv):
    """code x scale, exactly, in float64."""
    import torch

    rows, cols = codes.shape[-2:]
    s = scale_inv.to(torch.float64).repeat_interleave(FP8_BLOCK, dim=-2).repeat_interleave(FP8_BLOCK, dim=-1)
    return codes.to(torch.float64) * s[..., :rows, :cols]


def fake_quantize_groups(x):
    """x [..., K] as FP8 activations see it: per row and group of 128 channels, scale = amax / 448 in float32,
    code = E4M3(x / scale), value = code x scale (exact, in x's dtype if float64). DeepSeek's act_quant, FlashMoE's
    quantization of x and h, transformers' fp8_act_quant."""
    import torch

    k = x.shape[-1]
    rows = x.reshape(-1, k).to(torch.float32)
    pad = -k % FP8_BLOCK
    rows = torch.nn.functional.pad(rows, (0, pad))
    g = rows.reshape(rows.shape[0], -1, FP8_BLOCK)
    amax = torch.where(torch.isfinite(g), g.abs(), torch.zeros_like(g)).amax(dim=-1, keepdim=True)
    scale = amax / torch.full_like(amax, E4M3_MAX)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = (g / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    values = (codes.to(torch.float64) * scale.to(torch.float64)).reshape(rows.shape)[:, :k]
    return values.reshape(x.shape).to(x.dtype if x.dtype == torch.float64 else torch.float32)


def round_bf16(t):
    """t rounded to BF16 (through float32, as FlashMoE rounds its FP32 values), in t's dtype."""
    import torch

    return t.to(torch.float32).to(torch.bfloat16).to(t.dtype)


def check_torch_fp8_rules() -> str | None:
    """Holds torch's E4M3 conversions and `quantize_fp8_blocks` / `fake_quantize_groups` to the plain-Python rules
    (docs/fp8.md); returns what differs, or None."""
    import torch

    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float64).tolist()
    for c, got in enumerate(codes):
        want = e4m3_value(c)
        if not (got == want or (math.isnan(got) and math.isnan(want))):
            return f"torch decodes E4M3 code {c:#04x} as {got}, not {want}"
    finite = sorted({abs(e4m3_value(c)) for c in range(128) if not math.isnan(e4m3_value(c))})
    probes = [f32((a + b) / 2) for a, b in zip(finite, finite[1:])]  # every tie
    probes += [f32(a * (1 + d)) for a in finite[1:] for d in (-3e-3, 1e-7, 2e-3)] + [447.9, 448.0, 460.0, 2.0 ** -10]
    probes += [-p for p in probes]
    got = torch.tensor(probes, dtype=torch.float32).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    for p, g in zip(probes, got.to(torch.float64).tolist()):
        if g != e4m3_round(p):
            return f"torch rounds {p!r} to E4M3 {g}, FlashMoE's rule gives {e4m3_round(p)}"
    gen = torch.Generator().manual_seed(5)
    m = torch.randn(200, 300, generator=gen) * torch.tensor([0.01, 1.0, 30.0]).repeat_interleave(100)[None]
    codes_t, scales_t = quantize_fp8_blocks(m)
    ref_codes, ref_scales = quantize_blocks_reference(m.tolist())
    if scales_t.tolist() != ref_scales:
        return f"quantize_fp8_blocks' scales {scales_t.tolist()} differ from the rule's {ref_scales}"
    if codes_t.to(torch.float64).tolist() != ref_codes:
        return "quantize_fp8_blocks' codes differ from the rule's"
    rows = m[:3, :].tolist()
    got_rows = fake_quantize_groups(m[:3, :].double()).tolist()
    if got_rows != [fake_quantize_row_reference(r) for r in rows]:
        return "fake_quantize_groups differs from the rule's per-group quantization"
    return None


def read_safetensors_dir(directory: str) -> dict:
    """Every tensor of every *.safetensors file in `directory`."""
    from safetensors.torch import load_file

    tensors = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(directory, name)))
    if not tensors:
        raise RuntimeError(f"{directory} holds no safetensors file")
    return tensors


def split_fused_experts(tensors: dict) -> dict:
    """Fused experts (`….experts.gate_up_proj` [E, 2I, H] gate rows first, `….experts.down_proj` [E, H, I]) as the
    hub's per-expert `….experts.{e}.{gate,up,down}_proj.weight`: FP8 checkpoints store experts one tensor each."""
    out = {}
    for name, t in tensors.items():
        m = re.fullmatch(r"(.*\.experts)\.(gate_up_proj|down_proj)", name)
        if m is None or t.dim() != 3:
            out[name] = t
            continue
        prefix, kind = m.groups()
        for e in range(t.shape[0]):
            if kind == "down_proj":
                out[f"{prefix}.{e}.down_proj.weight"] = t[e].contiguous()
            else:
                inter = t.shape[1] // 2
                out[f"{prefix}.{e}.gate_proj.weight"] = t[e, :inter].contiguous()
                out[f"{prefix}.{e}.up_proj.weight"] = t[e, inter:].contiguous()
    return out


def spread_block_magnitudes_(block, gen) -> None:
    """Multiplies every 128 x 128 block of the MoE block's expert and shared-expert matrices by its own factor
    2**uniform(-1.5, 1.5), so every block gets a scale of its own (random uniform weights give every block nearly
    the same amax: a misplaced scale would go unseen). The router and the shared-expert gate are left as they are."""
    import torch

    with torch.no_grad():
        for name, p in block.named_parameters():
            if p.dim() < 2 or name.startswith("gate.") or "shared_expert_gate" in name:
                continue
            *lead, rows, cols = p.shape
            br, bc = fp8_scale_shape(p.shape)[-2:]
            u = torch.rand(*lead, br, bc, generator=gen, dtype=torch.float64) * 2 - 1
            f = (2.0 ** (FP8_BLOCK_SPREAD * u)).repeat_interleave(FP8_BLOCK, -2).repeat_interleave(FP8_BLOCK, -1)
            p.mul_(f[..., :rows, :cols].to(p.dtype))


def fp8_input(tokens: int, hidden: int, seed: int):
    """x [tokens, hidden] float32 holding BF16 values (FlashMoE rounds x to BF16 at fp8): normal values, each
    (token, 128-channel group) times its own factor 2**uniform(-1.5, 1.5)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen, dtype=torch.float32)
    groups = -(-hidden // FP8_BLOCK)
    u = torch.rand(tokens, groups, generator=gen) * 2 - 1
    x = x * (2.0 ** (FP8_BLOCK_SPREAD * u)).repeat_interleave(FP8_BLOCK, dim=1)[:, :hidden]
    return round_bf16(x).contiguous()


def write_fp8_checkpoints(float_dir: str, fp8_dir: str, deq_dir: str, family: str, moe_layers: list[int]) -> str:
    """From `save_pretrained`'s float checkpoint in `float_dir`, writes the hub-format FP8 checkpoint (fp8_dir) and
    the same weights dequantized exactly to F64 without quantization_config (deq_dir). Returns a summary."""
    import torch
    from safetensors.torch import save_file

    tensors = split_fused_experts(read_safetensors_dir(float_dir))
    fp8, deq, quantized = {}, {}, 0
    for name, t in sorted(tensors.items()):
        if not t.is_floating_point():
            fp8[name] = deq[name] = t.contiguous()
        elif fp8_quantized(name, t.dim()):
            codes, scale = quantize_fp8_blocks(t)
            fp8[name], fp8[name + "_scale_inv"] = codes, scale
            deq[name] = dequantize_fp8_blocks(codes, scale).contiguous()
            quantized += 1
        else:
            keep = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
            fp8[name] = t.to(keep).contiguous()
            deq[name] = fp8[name].to(torch.float64).contiguous()
    with open(os.path.join(float_dir, "config.json")) as f:
        config = json.load(f)
    for d, state, extra in ((fp8_dir, fp8, fp8_quantization_config(family, moe_layers)), (deq_dir, deq, None)):
        os.makedirs(d, exist_ok=True)
        save_file(state, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        c = dict(config)
        for key in ("torch_dtype", "dtype"):
            if key in c:
                c[key] = "bfloat16" if extra else "float64"
        if extra:
            c["quantization_config"] = extra
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(c, f, indent=2)
    experts = [n for n in fp8 if ".experts." in n and n.endswith(".weight") and fp8[n].dtype == torch.float8_e4m3fn]
    return (f"{quantized} F8_E4M3 matrices with weight_scale_inv ({len(experts)} of them per-expert), "
            f"{len(fp8) - 2 * quantized} other tensors BF16/F32")


def from_pretrained(directory: str, **kwargs):
    """(model, loading info) from `from_pretrained` with the eager experts (the plain loop), eval mode."""
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(directory, experts_implementation="eager",
                                                           output_loading_info=True, **kwargs)
    except TypeError:
        model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True, **kwargs)
    return model.eval(), info


def unloaded_block_keys(info) -> list[str]:
    """The layer-1 MoE block's tensors that from_pretrained reported missing or mismatched."""
    keys = list((info or {}).get("missing_keys", [])) + [str(k) for k in (info or {}).get("mismatched_keys", [])]
    return [k for k in keys if ".layers.1.mlp." in k]


def emulated_block(block, family: str, mode: str):
    """A float64 copy of `block` (dequantized weights) whose routed experts (and shared expert) compute FP8 as
    `mode` says, on the block's own routing:
      flashmoe: docs/fp8.md: x quantized per group, h = act(gate)*up rounded to BF16, then quantized; the shared
                expert in BF16 (its weights, x and h rounded to BF16);
      transformers: FP8Experts / FP8Linear: x and h quantized per group (h not rounded), the shared expert too."""
    import torch

    weights = stacked_weights(block, family)
    act = getattr(block.experts, "act_fn", None) or torch.nn.functional.silu

    class Experts(torch.nn.Module):
        def forward(self, hidden_states, top_k_index=None, top_k_weights=None, *rest, **kwargs):
            top_k_index = kwargs.get("top_k_index", kwargs.get("selected_experts", top_k_index))
            top_k_weights = kwargs.get("top_k_weights", kwargs.get("routing_weights", top_k_weights))
            x = hidden_states.to(torch.float64)
            a = fake_quantize_groups(x)
            out = torch.zeros_like(x)
            for e in range(weights["w1"].shape[0]):
                tok, pos = torch.where(top_k_index == e)
                if tok.numel() == 0:
                    continue
                rows = a[tok]
                h = act(rows @ weights["w1"][e].double().T) * (rows @ weights["w3"][e].double().T)
                if mode == "flashmoe":
                    h = round_bf16(h)
                o = fake_quantize_groups(h) @ weights["w2"][e].double().T
                w = top_k_weights[tok, pos] if top_k_weights.shape == top_k_index.shape else top_k_weights[tok, e]
                out.index_add_(0, tok, o * w.to(torch.float64)[:, None])
            return out.to(hidden_states.dtype)

    class Shared(torch.nn.Module):
        def forward(self, x):
            w1, w3, w2 = (weights[k].double() for k in ("shared_w1", "shared_w3", "shared_w2"))
            x64 = x.to(torch.float64)
            if mode == "flashmoe":
                w1, w3, w2, a = round_bf16(w1), round_bf16(w3), round_bf16(w2), round_bf16(x64)
                return (round_bf16(act(a @ w1.T) * (a @ w3.T)) @ w2.T).to(x.dtype)
            a = fake_quantize_groups(x64)
            return (fake_quantize_groups(act(a @ w1.T) * (a @ w3.T)) @ w2.T).to(x.dtype)

    out = copy.deepcopy(block).double()
    if not hasattr(out, "experts"):
        raise Skip(f"{type(block).__name__} has no experts module to emulate")
    out.experts = Experts()
    if "shared_w1" in weights:
        if "shared_gate" in weights:
            raise Skip("the emulation has no gated shared expert (Qwen2-MoE)")
        name = "shared_experts" if hasattr(out, "shared_experts") else "shared_expert"
        setattr(out, name, Shared())
    return out


@contextlib.contextmanager
def torch_standin_kernels():
    """Runs transformers' FP8Linear / FP8Experts (eager) with a pure-PyTorch stand-in for the Hub kernel they call
    (kernels-community/finegrained-fp8; DeepGEMM off): the kernel's documented arithmetic, scale = amax / 448 per
    token and 128 channels, code = E4M3(x / scale), block-scaled products, here summed exactly in float64.

    transformers 5.17 (integrations/finegrained_fp8.py) keeps the loaded kernel in the module global
    `_FINEGRAINED_FP8` (a FineGrainedFP8 of matmul, batched_matmul, grouped_matmul) and calls
    `matmul(input, weight, weight_scale_inv, block_size, output_dtype, activation_scale=None)`, which quantizes the
    activations itself; earlier 5.x releases load a bundle with `fp8_act_quant` and `fp8_matmul` through
    `_load_finegrained_fp8_kernel()`. Both are stood in for; anything else is a Skip."""
    import torch
    import transformers.integrations.finegrained_fp8 as fg

    def act_quant(x, block_size=FP8_BLOCK):
        k = x.shape[-1]
        if k % block_size:
            raise ValueError(f"activation width {k} is not a multiple of {block_size}")
        g = x.reshape(-1, k // block_size, block_size).to(torch.float32)
        amax = g.abs().amax(dim=-1)
        s = (amax / torch.full_like(amax, E4M3_MAX)).clamp(min=1e-12)
        q = (g / s[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        return q.reshape(x.shape), s.reshape(*x.shape[:-1], k // block_size)

    def quantized_matmul(a, b, a_scale, b_scale, block_size=None, output_dtype=torch.float32):
        """sum_j (a codes . b codes)_j a_scale_j b_scale_j over the 128-wide K blocks j, exactly."""
        k, n = a.shape[-1], b.shape[0]
        a2 = a.reshape(-1, k).to(torch.float64)
        sa = a_scale.reshape(a2.shape[0], -1).to(torch.float64)
        if block_size is None:
            a64, b64 = a2 * sa[:, :1], b.to(torch.float64) * b_scale.to(torch.float64).reshape(-1)[0]
        else:
            bn, bk = block_size
            a64 = a2 * sa.repeat_interleave(bk, dim=1)[:, :k]
            sb = b_scale.to(torch.float64).repeat_interleave(bn, dim=0)[:n].repeat_interleave(bk, dim=1)[:, :k]
            b64 = b.to(torch.float64) * sb
        return (a64 @ b64.T).to(output_dtype).reshape(*a.shape[:-1], n)

    def matmul_2d(input, weight, weight_scale_inv, block_size=None, output_dtype=None, activation_scale=None,
                  *rest, **kwargs):
        if activation_scale is not None:
            raise NotImplementedError("the stand-in covers dynamic activation quantization only")
        q, s = act_quant(input.contiguous(), block_size[1] if block_size is not None else input.shape[-1])
        return quantized_matmul(q, weight, s, weight_scale_inv, block_size, output_dtype or input.dtype)

    def unsupported(*args, **kwargs):
        raise NotImplementedError("the stand-in kernels cover the eager experts path only")

    def no_deepgemm(*args, **kwargs):
        raise ImportError("DeepGEMM is off while the stand-in kernels run")

    saved, saved_env = {}, os.environ.get("TRANSFORMERS_DISABLE_DEEPGEMM_LINEAR")

    def replace(name, value):
        saved[name] = getattr(fg, name)
        setattr(fg, name, value)

    if hasattr(fg, "_FINEGRAINED_FP8") and hasattr(fg, "FineGrainedFP8"):  # 5.17
        try:
            bundle = fg.FineGrainedFP8(matmul=matmul_2d, batched_matmul=unsupported, grouped_matmul=unsupported)
        except TypeError as e:
            raise Skip(f"transformers' FineGrainedFP8 bundle has other fields than this script knows: {e}") from e
        replace("_FINEGRAINED_FP8", bundle)
    elif hasattr(fg, "_load_finegrained_fp8_kernel"):  # earlier 5.x
        bundle = types.SimpleNamespace(
            fp8_act_quant=act_quant, batched_fp8_matmul=unsupported, grouped_fp8_matmul=unsupported,
            fp8_matmul=lambda a, b, sa, sb, block_size=None, output_dtype=torch.float32, *r, **k:
            quantized_matmul(a, b, sa, sb, block_size, output_dtype))
        replace("_load_finegrained_fp8_kernel", lambda: bundle)
    else:
        raise Skip("this transformers' integrations/finegrained_fp8.py has neither _FINEGRAINED_FP8 nor "
                   "_load_finegrained_fp8_kernel to stand in for")
    for name, value in (("is_deepgemm_loadable", lambda *a, **k: False), ("_load_deepgemm_kernel", no_deepgemm)):
        if hasattr(fg, name):
            replace(name, value)
    os.environ["TRANSFORMERS_DISABLE_DEEPGEMM_LINEAR"] = "1"
    try:
        yield
    finally:
        for name, original in saved.items():
            setattr(fg, name, original)
        if saved_env is None:
            os.environ.pop("TRANSFORMERS_DISABLE_DEEPGEMM_LINEAR", None)
        else:
            os.environ["TRANSFORMERS_DISABLE_DEEPGEMM_LINEAR"] = saved_env


def transformers_fp8_output(fp8_dir: str, x, standin: bool = False):
    """transformers' own FP8 output of layer 1's MoE block for x: the checkpoint loaded on the GPU in float32 with
    its FP8 layers (FP8Experts for the fused experts, FP8Linear for the rest), eager experts. Raises Skip with the
    reason where transformers cannot (no GPU, layers not converted or not loaded, its kernels missing)."""
    import torch

    if not torch.cuda.is_available():
        raise Skip("no CUDA device: transformers runs FP8 layers on the GPU only (on the CPU it dequantizes)")
    try:
        model, info = from_pretrained(fp8_dir, dtype=torch.float32, device_map="cuda")
    except Exception as e:  # noqa: BLE001 - any loading failure is transformers' to explain
        raise Skip(f"from_pretrained failed: {type(e).__name__}: {first_line(e)}") from e
    block = moe_block(model)
    fp8_params = [n for n, p in block.experts.named_parameters() if p.dtype == torch.float8_e4m3fn]
    if not fp8_params:
        raise Skip(f"transformers did not keep layer 1's experts in FP8 ({type(block.experts).__name__}; it "
                   f"dequantizes on GPUs below compute capability 8.9)")
    missing = unloaded_block_keys(info)
    if missing:
        raise Skip(f"transformers left layer-1 tensors unloaded: {', '.join(missing[:6])}")
    try:
        with torch_standin_kernels() if standin else contextlib.nullcontext():
            y = run_block(block, x.to("cuda", torch.float32))
    except Skip:
        raise
    except Exception as e:  # noqa: BLE001
        raise Skip(f"its FP8 forward failed: {type(e).__name__}: {first_line(e)}", stage="forward") from e
    finally:
        del model
        torch.cuda.empty_cache()
    return y.detach().to("cpu", torch.float32), type(block.experts).__name__


def transformers_dequantized_output(fp8_dir: str, x):
    """The block's output in float64 with the checkpoint loaded by transformers with
    FineGrainedFP8Config(dequantize=True) (on the CPU)."""
    import torch

    try:
        from transformers import FineGrainedFP8Config

        model, info = from_pretrained(fp8_dir, dtype=torch.float64,
                                      quantization_config=FineGrainedFP8Config(dequantize=True))
    except Exception as e:  # noqa: BLE001
        raise Skip(f"from_pretrained(dequantize=True) failed: {type(e).__name__}: {first_line(e)}") from e
    missing = unloaded_block_keys(info)
    if missing:
        raise Skip(f"transformers left layer-1 tensors unloaded: {', '.join(missing[:6])}")
    block = moe_block(model).double()
    if any(p.dtype != torch.float64 for p in block.parameters()):
        raise Skip("dequantize=True left non-float64 parameters in the block")
    return run_block(block, x.double())


def run_fp8_family(args, binary: str, root: str, family: str, seed: int) -> list[tuple]:
    """The fp8 case of `family` (check_transformers.py's docstring): writes the FP8 checkpoint, computes the
    references, runs FlashMoE on every backend; returns rows (family, comparison, error, limit, worst token, status,
    note)."""
    import torch
    from safetensors.torch import load_file, save_file

    rows: list[tuple] = []
    loose, tight = args.fp8_tolerance, args.tolerance

    def add(comparison: str, y, ref, limit: float) -> None:
        err, worst = relative_error(y, ref), worst_token(y, ref)
        status = "ok" if err < limit else "FAIL"  # NaN fails
        print(f"   {status:<4}  {comparison:<46} rel. error {err:.2e} (limit {limit:.0e}), worst {worst}")
        rows.append((family, comparison, err, limit, worst, status, ""))

    def other(comparison: str, status: str, reason: str) -> None:
        print(f"   {status:<4}  {comparison:<46} {reason}")
        rows.append((family, comparison, float("nan"), float("nan"), "", status, reason))

    fam_dir = os.path.join(root, family, "fp8")
    sizes = dict(FP8_SIZES)
    check_fp8_sizes(sizes)
    model = build_model(family, seed=seed, **sizes)
    block = moe_block(model)
    spread_block_magnitudes_(block, torch.Generator().manual_seed(seed + 3))
    with torch.no_grad():  # the router as the hub stores it: BF16 (FlashMoE rounds it to BF16 at fp8 anyway)
        block.gate.weight.copy_(round_bf16(block.gate.weight))
    print(f"\n== {family} fp8: {type(block).__name__}, H = {sizes['hidden']}, I = {sizes['inter']}, "
          f"{sizes['experts']} experts, top-{sizes['top_k']}, {TOKENS} tokens")
    float_dir = os.path.join(fam_dir, "float")
    fp8_dir, deq_dir = os.path.join(fam_dir, "checkpoint"), os.path.join(fam_dir, "dequantized")
    model.save_pretrained(float_dir)
    summary = write_fp8_checkpoints(float_dir, fp8_dir, deq_dir, family, moe_layers=[1])
    print(f"   {fp8_dir}: {summary}; layer-1 experts stored {describe_layout(fp8_dir)}")
    x = fp8_input(TOKENS, sizes["hidden"], seed + 7)
    x_path = os.path.join(fam_dir, "x.safetensors")
    save_file({"x": x}, x_path)

    # References on the CPU in float64: the dequantized weights (through transformers' own loader and block), and
    # that block with FP8 activations emulated as FlashMoE and as transformers compute them.
    ref_model, info = from_pretrained(deq_dir, dtype=torch.float64)
    missing = unloaded_block_keys(info)
    if missing:
        raise RuntimeError(f"transformers left layer-1 tensors of the dequantized checkpoint unloaded: {missing[:6]}")
    ref_block = moe_block(ref_model)
    y_deq = run_block(ref_block, x.double())
    emulated: dict = {}
    for mode in ("flashmoe", "transformers"):
        try:
            emulated[mode] = run_block(emulated_block(ref_block, family, mode), x.double())
        except Skip as e:
            emulated[mode] = e
    if not isinstance(emulated["flashmoe"], Skip):
        print(f"   FP8 activations alone (FlashMoE's emulation vs dequantized f64): rel. error "
              f"{relative_error(emulated['flashmoe'], y_deq):.2e}")

    ys = {}
    for backend in args.backends:
        y_path = os.path.join(fam_dir, f"y-{backend}.safetensors")
        cmd, proc = run_cli(binary, fp8_dir, 1, x_path, y_path, backend, precision="fp8")
        if proc.returncode != 0:
            message = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
            print(f"   $ FLASHMOE_EXPERIMENTAL_FP8=1 {' '.join(cmd)}")
            other(f"{backend}: flashmoe run --precision fp8", "FAIL",
                  f"exit {proc.returncode}: {message[-1] if message else '(no message)'}")
            continue
        out = load_file(y_path)
        y = out["y"] if "y" in out else next(iter(out.values()))
        if tuple(y.shape) != tuple(y_deq.shape):
            other(f"{backend}: flashmoe run --precision fp8", "FAIL",
                  f"output shape {tuple(y.shape)}, expected {tuple(y_deq.shape)}")
            continue
        ys[backend] = y
        if isinstance(emulated["flashmoe"], Skip):
            other(f"{backend} vs emulated fp8", "SKIP", str(emulated["flashmoe"]))
        else:
            add(f"{backend} vs emulated fp8", y, emulated["flashmoe"], fp8_limit("emulated", backend, loose, tight))
        add(f"{backend} vs dequantized f64", y, y_deq, fp8_limit("dequantized", backend, loose, tight))
    if "cuda" in ys and "cpu" in ys:
        add("cuda vs cpu", ys["cuda"], ys["cpu"], fp8_limit("cuda-vs-cpu", None, loose, tight))

    # transformers' own FP8 layers: with its Hub kernels, else with the stand-in (clearly labelled).
    label, y_tf = "transformers fp8", None
    try:
        y_tf, experts_class = transformers_fp8_output(fp8_dir, x)
        print(f"   transformers fp8: layer-1 experts {experts_class}, its own kernels")
    except Skip as e:
        other(label, "SKIP", str(e))
        if e.stage == "forward":
            label = "transformers fp8 [stand-in]"
            try:
                y_tf, experts_class = transformers_fp8_output(fp8_dir, x, standin=True)
                print(f"   {label}: layer-1 experts {experts_class}; its Hub kernels replaced by "
                      f"torch_standin_kernels (same arithmetic, exact sums)")
            except Skip as e2:
                other(label, "SKIP", str(e2))
    if y_tf is not None:
        for backend, y in ys.items():
            add(f"{backend} vs {label}", y, y_tf, fp8_limit("transformers", backend, loose, tight))
        if isinstance(emulated["transformers"], Skip):
            other(f"{label} vs its emulation", "SKIP", str(emulated["transformers"]))
        else:
            add(f"{label} vs its emulation", y_tf, emulated["transformers"],
                fp8_limit("transformers-emulated", None, loose, tight))
            if rows[-1][5] == "FAIL":
                print("   note: transformers' FP8 output disagrees with the emulation of the arithmetic it is "
                      "assumed to compute, so the FlashMoE rows against it say little about FlashMoE")
    try:
        add("transformers dequantized vs ours", transformers_dequantized_output(fp8_dir, x), y_deq,
            fp8_limit("transformers-dequantized", None, loose, tight))
    except Skip as e:
        other("transformers dequantized vs ours", "SKIP", str(e))
    return rows
