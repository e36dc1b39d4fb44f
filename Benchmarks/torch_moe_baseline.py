#!/usr/bin/env python3
"""PyTorch baselines for FlashMoE: a whole MoE layer (router GEMM + softmax/sigmoid top-k + dispatch + experts +
weighted combine) timed on one GPU, in two implementations.

- `loop`: a per-expert Python loop (tokens sorted by expert once, one host sync for the counts, then per expert:
  index_select its tokens, the FFN GEMMs, index_add_ of the weighted output into an fp32 accumulator). Runs in TF32
  (fp32 tensors, TF32 matmuls enabled), in bf16 and in fp8.
- `grouped`: bf16 with `torch._grouped_mm` (tokens sorted by expert, offsets = int32 cumulative counts, no host
  sync; optional per-expert padding with `--group-align`), then unpermute and a weighted sum over the k slots; and
  fp8 with `torch._scaled_grouped_mm`.

Precision fp8 (only with `--precisions fp8`; docs/fp8.md is FlashMoE's definition): the routed experts' weights are
quantized once at setup from the same random bf16 layer (scale = amax / 448 per block, zero → 1, E4M3 codes with
saturation), the activations on every call, inside the timed layer: x per token, and h (after the activation, bf16)
per row. The router (bf16 GEMM, fp32 logits), the shared expert (bf16) and the combine (fp32) are as FlashMoE runs
them. The two implementations scale differently, and every fp8 record says which in its "scaling" field:
- `loop`, "blockwise": DeepSeek-V3's scheme, FlashMoE's own: activations 1x128 (per token and 128-channel group),
  weights 128x128 blocks, fp32 accumulation with the scales applied per 128-wide K block. Per expert
  `torch.nn.functional.scaled_mm` (aten._scaled_mm_v2, cuBLASLt's VEC128_32F x BLK128x128_32F scale modes; torch
  2.11 runs it on sm_90 only, with cuBLASLt >= 12.9; no fast accumulation there). GEMM0 writes fp32, the activation
  runs in fp32 and h is rounded to bf16 before it is quantized (FlashMoE's order), GEMM1 writes bf16. Each
  expert's rows are padded to a multiple of `--fp8-row-align` (zero codes, scale 1).
- `grouped`, "rowwise": the only fp32-scaled recipe `torch._scaled_grouped_mm` has on sm_90 (CUTLASS; also
  sm_100): one scale per activation row (per token, and per row of h) and one per weight output channel, so COARSER
  than FlashMoE's 128-blocks (a row's largest value sets the scale of all its channels). The weights are
  requantized rowwise from the same bf16 layer. bf16 output (its only one) and activation, no fast accumulation.
Every fp8 API is tried once at startup on a small layer through the same code: one that raises (unsupported on this
GPU or torch) leaves its cases out as skipped, with the first line of the exception, and the run goes on; so does
one that raises later, in a check or a timed case.

Timing: CUDA events around one whole layer call, the GPU idle before each call (so host launch overhead is in the
number, as it is in any caller's), ≥ 5 warm-up calls, median and min of ≥ 20 timed calls, rotating among ≥ 2
input sets. The floor for each case is max(FLOPs / matmul rate, bytes / copy bandwidth) with rates measured at
startup on the same device (best of 10: 8192³ bf16 and TF32 matmul, a 2 GiB device-to-device copy counting read +
write bytes; a plain-fp32 matmul is measured too, to prove TF32 is really on; with fp8, an 8192³ E4M3
`torch._scaled_mm` with per-tensor scales and fast accumulation, the fastest fp8 GEMM torch has). fp8 bytes count
the experts' weights at one byte and the router, shared expert and activations at two (bf16).

Example (GPU host):  PYTHONUNBUFFERED=1 python3 Benchmarks/torch_moe_baseline.py --check --json torch.json
fp8 next to bf16:    python3 Benchmarks/torch_moe_baseline.py --presets qwen3-30b-a3b --tokens 1,64,4096 \
                         --precisions bf16,fp8 --check --json torch-fp8.json
Run `--help` for the options. Needs torch >= 2.8 with CUDA (`torch._grouped_mm`); fp8 needs
`torch.nn.functional.scaled_mm` and `torch._scaled_grouped_mm` (torch 2.11 has both). Tested against the API of 2.11.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fnmatch
import gc
import json
import math
import os
import statistics
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402  (plain-Python helpers shared with the other scripts and the unit tests)
from benchlib import PRESETS, PresetSpec  # noqa: E402

IMPLS = ("loop", "grouped")
#: The default precisions (what every existing caller gets); fp8 runs only when asked for.
PRECISIONS = ("tf32", "bf16")
ALL_PRECISIONS = ("tf32", "bf16", "fp8")
#: Precisions the grouped implementation runs in (bf16 through torch._grouped_mm, fp8 through _scaled_grouped_mm).
GROUPED_PRECISIONS = ("bf16", "fp8")
#: Relative (Frobenius) error limits of `--check`. fp8: each implementation against a float64 layer on the same
#: E4M3 codes and scales (its weights dequantized, x and h quantized by its own rule, h rounded to bf16 first as
#: FlashMoE does), with the weight scales multiplied by 2^-2..2^2 block by block (row by row for rowwise) and x's
#: groups by the same factors, so that a scale applied to the wrong block, row or token moves the output by tens
#: of percent. What remains is rounding: fp32 (Hopper: truncated) tensor-core sums, and the bf16 outputs, which
#: move a few h values across an E4M3 code boundary or change a group's scale. FlashMoE's own GPU against its fp8
#: oracle measures 2.5e-3 to 8e-3 and is held to 5e-2 (docs/fp8.md, Tolerances), hence the same 5e-2 here. With
#: the GEMMs emulated in fp32 on the CPU (test_torch_fp8.py) the loop measures ~2e-3; grouped, whose GEMM0 output
#: and activation are bf16, 1.2e-2 to 1.7e-2 with the gated FFNs (2e-3 with the plain one).
TOL_VS_FP64 = {"tf32": 1e-2, "bf16": 2.5e-2, "fp8": 5e-2}
#: fp8 against the float64 layer on the unquantized bf16 weights and inputs: E4M3's own error (3 mantissa bits,
#: up to 6.25 % an element) through x, both weights and h. FlashMoE measures 4.5 to 6.2 % blockwise on its test
#: layers and bounds it by 8 %; rowwise scaling and the check's input, whose 128-channel groups differ by up to
#: 16x, add to it, hence 1.2e-1: far below what a missing or misplaced scale does (O(1)).
TOL_FP8_VS_UNQUANTIZED = 1.2e-1
TOL_GROUPED_VS_LOOP = 2.5e-2
TOL_ROUTE_WEIGHT = 1e-4

#: fp8 (E4M3): the largest finite code, the block / group width, and what each implementation's scales cover.
FP8_MAX = 448.0
FP8_BLOCK = 128
FP8_SCALING = {"loop": "blockwise", "grouped": "rowwise"}
FP8_SCALING_TEXT = {
    "blockwise": "1x128 activations, 128x128 weights (DeepSeek-V3's, as FlashMoE)",
    "rowwise": "per-row activations, per-output-channel weights (coarser than FlashMoE's 128-blocks)",
}
FP8_API = {"loop": "torch.nn.functional.scaled_mm (aten._scaled_mm_v2, cuBLASLt)",
           "grouped": "torch._scaled_grouped_mm (CUTLASS)"}


class BenchError(Exception):
    """A problem the user can fix; main() prints the message and exits with status 2."""


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Command line (no torch needed: the unit tests exercise it on a machine without a GPU).


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time PyTorch MoE layers (per-expert loop, torch._grouped_mm; at fp8 F.scaled_mm with block "
                    "scales and torch._scaled_grouped_mm with rowwise ones) for FlashMoE's presets.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--presets", default=",".join(PRESETS), help="comma list of presets")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma list of implementations: loop, grouped")
    p.add_argument("--precisions", default=",".join(PRECISIONS),
                   help="comma list: tf32 (fp32 tensors, TF32 matmuls), bf16, fp8 (E4M3 experts: loop with "
                        "1x128/128x128 block scales, grouped with rowwise scales; only when asked for); grouped "
                        "runs bf16 and fp8")
    p.add_argument("--tokens", default=None,
                   help="token counts for every preset, comma list (default: each preset's own, e.g. 4096,64)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per case (median and min reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls per case before timing")
    p.add_argument("--input-sets", type=int, default=2, help="distinct random inputs rotated through (>= 2)")
    p.add_argument("--group-align", type=int, default=1,
                   help="grouped: pad each expert's rows to a multiple of this (empty experts get one block); "
                        "1 = no padding")
    p.add_argument("--fp8-row-align", type=int, default=4,
                   help="loop at fp8: pad each expert's rows to a multiple of this, so that the columns of its "
                        "M-major 1x128 activation scales start 16-byte aligned (4 rows of fp32); 1 = no padding")
    p.add_argument("--skip", default="",
                   help="comma list of PRESET[:IMPL[:PRECISION]] patterns (shell wildcards; an empty part "
                        "matches all) to leave out, e.g. deepseek-v3:loop:tf32 or deepseek-v3::tf32")
    p.add_argument("--check", action="store_true",
                   help="before timing each preset: compare routers with a per-token float64 reference, the loop "
                        "with a float64 layer, grouped (align 1, 8 and --group-align) with the loop; fp8: each "
                        "implementation with a float64 layer on its own codes and scales (grouped at align 1, 16 "
                        "and --group-align) and with the unquantized bf16 layer; a failure skips that preset's "
                        "timing and makes the exit status 1, an fp8 API that raises skips its cases")
    p.add_argument("--check-tokens", type=int, default=96, help="token count of the --check runs")
    p.add_argument("--seed", type=int, default=1234, help="seed of the weights and inputs")
    p.add_argument("--json", default=None, metavar="FILE", help="write the results as a JSON list to FILE")
    p.add_argument("--device", default="cuda:0", help="torch device")
    args = p.parse_args(argv)
    try:
        args.presets = benchlib.parse_list(args.presets, list(PRESETS), "presets")
        args.impls = benchlib.parse_list(args.impls, IMPLS, "impls")
        args.precisions = benchlib.parse_list(args.precisions, ALL_PRECISIONS, "precisions")
        args.tokens = benchlib.parse_tokens(args.tokens) if args.tokens is not None else None
        args.skip = parse_skip(args.skip)
    except ValueError as e:
        p.error(str(e))
    benchlib.check_torch_run_args(p, args)
    if args.group_align < 1 or args.group_align > 128:
        p.error(f"--group-align must be in 1...128, got {args.group_align}")
    if args.fp8_row_align < 1 or args.fp8_row_align > 128:
        p.error(f"--fp8-row-align must be in 1...128, got {args.fp8_row_align}")
    return args


def parse_skip(text: str) -> list[tuple[str, str, str]]:
    """`a:b:c,d` → [(a, b, c), (d, *, *)]; each part is an fnmatch pattern."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        parts = item.split(":")
        if len(parts) > 3 or not parts[0]:
            raise ValueError(f"--skip item '{item}' is not PRESET[:IMPL[:PRECISION]]")
        parts = [q or "*" for q in parts] + ["*"] * (3 - len(parts))
        if not any(fnmatch.fnmatchcase(n, parts[0]) for n in PRESETS):
            raise ValueError(f"--skip item '{item}' matches no preset ({', '.join(PRESETS)})")
        out.append((parts[0], parts[1], parts[2]))
    return out


def is_skipped(skip: list[tuple[str, str, str]], preset: str, impl: str, precision: str) -> bool:
    return any(fnmatch.fnmatchcase(preset, a) and fnmatch.fnmatchcase(impl, b) and fnmatch.fnmatchcase(precision, c)
               for a, b, c in skip)


def plan_case(args: argparse.Namespace, preset: str, precision: str) -> tuple[list[str], bool, list[str]]:
    """What to do for one preset at one precision: (the implementations to time, whether to run the checks, the
    cases `--skip` left out). grouped runs bf16 and fp8. A precision that is not timed is still checked when
    `--check` needs its weights (bf16 for grouped), but one whose every implementation `--skip` left out is not
    built at all: that is what skipping it is for (DeepSeek-V3 in TF32 needs 45 GB of weights). fp8 checks each
    timed implementation against its own float64 reference, so it checks exactly the implementations it times."""
    timed = precision in args.precisions
    candidates = [i for i in args.impls if timed and not (i == "grouped" and precision not in GROUPED_PRECISIONS)]
    impls = [i for i in candidates if not is_skipped(args.skip, preset, i, precision)]
    left_out = [f"{preset}:{i}:{precision} (--skip)" for i in candidates if i not in impls]
    # Checking a precision needs the loop (the reference of grouped) or grouped itself (bf16, fp8).
    checking = (args.check and ("loop" in args.impls or precision in GROUPED_PRECISIONS)
                and not (candidates and not impls))
    if precision == "fp8":
        checking = args.check and bool(impls)
    return impls, checking, left_out


def precisions_to_build(args: argparse.Namespace) -> list[str]:
    """The precisions run() builds layers in, in order: those asked for, plus bf16 when `--check` has to check
    grouped and no precision asked for runs it (grouped's bf16 check, as for `--precisions tf32`)."""
    out = list(args.precisions)
    if args.check and "grouped" in args.impls and not any(p in GROUPED_PRECISIONS for p in out):
        out.append("bf16")
    return out


# ---------------------------------------------------------------------------------------------------------------
# fp8 shapes and sizes (plain Python: the unit tests check them without torch).


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return ceil_div(a, b) * b


def fp8_scalings(impls) -> list[str]:
    """The weight scalings the fp8 layer must hold for these implementations (loop blockwise, grouped rowwise)."""
    return [FP8_SCALING[i] for i in IMPLS if i in impls]


def fp8_block_scale_shape(rows: int, cols: int) -> tuple[int, int]:
    """Blocks of 128x128 (the last one of a dimension shorter) of a [rows, cols] weight: its scale tensor's shape."""
    return ceil_div(rows, FP8_BLOCK), ceil_div(cols, FP8_BLOCK)


def fp8_padded_k_blocks(k: int) -> int:
    """cuBLASLt's L4: the K blocks of a 128x128-scaled operand rounded up to a multiple of 4, its scales' leading
    dimension (torch 2.11 asks for exactly this: _meta_registrations.py, _check_scaled_mm_sizes_v2)."""
    return round_up(ceil_div(k, FP8_BLOCK), 4)


def fp8_weight_scale_layout(n: int, k: int) -> dict:
    """How the loop hands one expert matrix's 128x128 scales to F.scaled_mm as scale_b (mat_b = W.t(), [K, N]):
    stored [ceil(N/128), L4] row-major (K blocks past ceil(K/128) hold 1.0), passed transposed: shape [L4, N/128],
    strides (1, L4) (torch 2.11's BlockWise128x128 for the B operand)."""
    nb, kb = fp8_block_scale_shape(n, k)
    l4 = fp8_padded_k_blocks(k)
    return {"stored": (nb, l4), "blocks": (nb, kb), "passed": (l4, nb), "strides": (1, l4)}


def fp8_activation_scale_layout(m: int, k: int) -> dict:
    """How the loop hands the 1x128 scales of m rows to F.scaled_mm as scale_a: shape [m, ceil(K/128)], outer-dim-
    major, strides (1, m) (torch 2.11's BlockWise1x128; m is the padded row count)."""
    return {"passed": (m, ceil_div(k, FP8_BLOCK)), "strides": (1, m)}


def fp8_shape_problem(spec: PresetSpec) -> str | None:
    """Why the fp8 baselines cannot run this shape, or None: H and I must be multiples of 128 (torch 2.11's block
    checks take K // 128 and N // 128 whole blocks)."""
    bad = [f"{n} {v}" for n, v in (("hidden", spec.hidden), ("intermediate", spec.inter)) if v % FP8_BLOCK]
    return f"fp8 needs multiples of {FP8_BLOCK}, got {', '.join(bad)}" if bad else None


def fp8_scale_bytes(spec: PresetSpec, scaling: str) -> int:
    """Bytes of the routed experts' fp32 weight scales in one scaling."""
    H, I, E = spec.hidden, spec.inter, spec.experts
    n_in = (2 if spec.gated else 1) * I
    if scaling == "blockwise":
        return 4 * E * (ceil_div(n_in, FP8_BLOCK) * fp8_padded_k_blocks(H) + ceil_div(H, FP8_BLOCK)
                        * fp8_padded_k_blocks(I))
    if scaling == "rowwise":
        return 4 * E * (n_in + H)
    raise ValueError(f"unknown fp8 scaling {scaling}")


#: Scratch of quantizing the weights (fp32 copies of one chunk of experts and their quotients).
FP8_QUANT_SCRATCH = 2 << 30


# ---------------------------------------------------------------------------------------------------------------
# Torch parts. `torch` and `F` are module globals bound by load_torch(), so nothing above needs torch.

torch = None  # type: ignore[assignment]
F = None  # type: ignore[assignment]
GROUPED_MM = None
#: fp8's GEMMs: F.scaled_mm (with F.ScalingType / F.SwizzleType) and torch._scaled_grouped_mm; None where absent.
#: They are module globals so that the unit tests can put CPU emulations in their place.
SCALED_MM = None
SCALED_GROUPED_MM = None


def bind_torch():
    """Imports torch and binds this module's globals `torch`, `F`, `GROUPED_MM` (None when the build has no
    grouped matmul), `SCALED_MM` and `SCALED_GROUPED_MM` (fp8's; None when absent); needs no GPU, so
    torch_ep_baseline.py's CPU mode and the unit tests can use the layer code."""
    global torch, F, GROUPED_MM, SCALED_MM, SCALED_GROUPED_MM
    try:
        import torch as _torch
        import torch.nn.functional as _F
    except ImportError as e:
        raise BenchError(f"cannot import torch ({e}); run this on the GPU host with PyTorch installed") from None
    torch, F = _torch, _F
    GROUPED_MM = getattr(torch, "_grouped_mm", None) or getattr(F, "grouped_mm", None)
    has_v2 = all(hasattr(F, n) for n in ("scaled_mm", "ScalingType", "SwizzleType"))
    SCALED_MM = scaled_mm_blockwise if has_v2 else None
    SCALED_GROUPED_MM = getattr(torch, "_scaled_grouped_mm", None)
    return torch


def load_torch(device: str):
    bind_torch()
    if not torch.cuda.is_available():
        raise BenchError("torch.cuda.is_available() is False: this benchmark needs an NVIDIA GPU")
    dev = torch.device(device)
    if dev.type != "cuda":
        raise BenchError(f"--device must be a CUDA device, got {device}")
    torch.cuda.set_device(dev)
    # TF32 only affects fp32 matmuls (the tf32 cases); bf16 matmuls are unaffected.
    set_tf32(True)
    return dev


def set_tf32(enabled: bool) -> None:
    """TF32 for fp32 matmuls on or off: the `fp32_precision` API of torch >= 2.9, else `allow_tf32`."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = "tf32" if enabled else "ieee"
    else:
        matmul.allow_tf32 = enabled


def dtype_of(precision: str):
    """The layer's tensors (fp8: the bf16 layer it is quantized from, and its activations)."""
    return {"tf32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.bfloat16}[precision]


class Layer:
    """Random weights of one preset in one dtype, on the device (uniform ±1/√fan_in; gate+up fused as [E, 2I, H]
    with the gate rows first, as transformers 5 stores `gate_up_proj`; down as [E, H, I])."""

    def __init__(self, spec: PresetSpec, dtype, device, seed: int):
        self.spec, self.dtype, self.device = spec, dtype, device
        g = torch.Generator(device=device)
        g.manual_seed(seed)
        H, I, E = spec.hidden, spec.inter, spec.experts

        def uniform(shape, fan_in):
            b = 1.0 / math.sqrt(fan_in)
            return torch.empty(shape, dtype=dtype, device=device).uniform_(-b, b, generator=g)

        self.wg = uniform((E, H), H)
        self.w_in = uniform((E, (2 if spec.gated else 1) * I, H), H)
        self.w_out = uniform((E, H, I), I)
        # A small nonzero bias keeps every biased score positive, so the 0.0 given to experts of dropped groups
        # never competes with a kept expert (the reference and torch.topk could break such ties differently).
        self.bias = (torch.empty(E, dtype=torch.float32, device=device).uniform_(-0.02, 0.02, generator=g)
                     if spec.router == "deepseek" else None)
        if spec.shared_inter:
            self.ws_in = uniform((2 * spec.shared_inter, H), H)
            self.ws_out = uniform((H, spec.shared_inter), spec.shared_inter)
        else:
            self.ws_in = self.ws_out = None
        # Views for torch._grouped_mm: mat_b is [E, K, N]; these are K-major (the transposed layout it accepts).
        self.w_in_t = self.w_in.transpose(1, 2)
        self.w_out_t = self.w_out.transpose(1, 2)

    def weight_bytes(self) -> int:
        ts = [self.wg, self.w_in, self.w_out, self.bias, self.ws_in, self.ws_out]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def weight_bytes_estimate(spec: PresetSpec, precision: str, impls=IMPLS) -> int:
    """Bytes of one layer's weights at their peak. fp8: the bf16 layer it is quantized from (kept until the checks
    ran), the E4M3 codes and fp32 scales of each scaling `impls` needs, and the quantization's scratch."""
    if precision == "fp8":
        codes = spec.experts * spec.ffn_mats * spec.hidden * spec.inter
        return (weight_bytes_estimate(spec, "bf16") + FP8_QUANT_SCRATCH
                + sum(codes + fp8_scale_bytes(spec, sc) for sc in fp8_scalings(impls)))
    eb = benchlib.ELEMENT_BYTES[precision]
    H, I, E = spec.hidden, spec.inter, spec.experts
    return eb * (E * H + E * spec.ffn_mats * H * I + 3 * H * spec.shared_inter)


def workspace_estimate(spec: PresetSpec, precision: str, tokens: int, input_sets: int, align: int) -> int:
    """Generous upper bound of the activations of one call (grouped's buffers, fp32 accumulators) + the inputs.
    fp8's activations are bf16, plus the E4M3 codes of x and h, grouped's fp32 combine and the fp32 copies made
    while quantizing."""
    eb = benchlib.STORAGE_BYTES[precision]
    n = tokens * spec.top_k + spec.experts * align
    H, I = spec.hidden, max(spec.inter, spec.shared_inter)
    per_call = n * (3 * H + 3 * I) * eb + tokens * H * 8 + tokens * 3 * I * eb + tokens * spec.experts * 16
    if precision == "fp8":
        per_call += n * (H + I) + n * H * 4 + 2 * n * (H + 2 * I) * 4
    return 2 * per_call + input_sets * tokens * H * eb


# --- routing ---------------------------------------------------------------------------------------------------


def gate_logits(layer: Layer, x):
    """Router GEMM in the layer's dtype (fp32 accumulation), logits in fp32."""
    return F.linear(x, layer.wg).float()


def route_from_logits(layer: Layer, logits):
    """(ids [S, k] int64, weights [S, k] fp32) from fp32 logits."""
    spec = layer.spec
    k = spec.top_k
    if spec.router == "softmax":
        probs = torch.softmax(logits, dim=-1)
        w, ids = torch.topk(probs, k, dim=-1)
        return ids, w / w.sum(dim=-1, keepdim=True)
    # DeepSeek-V3 (transformers' DeepseekV3TopkRouter + DeepseekV3MoE.route_tokens_to_experts).
    S, E, G = logits.shape[0], spec.experts, spec.groups
    scores = logits.sigmoid()
    choice = scores + layer.bias
    group_scores = choice.view(S, G, E // G).topk(2, dim=-1).values.sum(dim=-1)
    group_idx = torch.topk(group_scores, spec.groups_kept, dim=-1, sorted=False).indices
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
    score_mask = group_mask.unsqueeze(-1).expand(S, G, E // G).reshape(S, E)
    choice = choice.masked_fill(~score_mask.bool(), 0.0)
    ids = torch.topk(choice, k, dim=-1, sorted=False).indices
    w = scores.gather(1, ids)
    w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, w * spec.scaling


def route(layer: Layer, x):
    return route_from_logits(layer, gate_logits(layer, x))


# --- the two implementations ------------------------------------------------------------------------------------


def expert_ffn(layer: Layer, e: int, xe):
    I = layer.spec.inter
    h = F.linear(xe, layer.w_in[e])
    h = F.silu(h[:, :I]) * h[:, I:] if layer.spec.gated else F.relu(h)
    return F.linear(h, layer.w_out[e])


def shared_ffn(layer: Layer, x):
    Is = layer.spec.shared_inter
    h = F.linear(x, layer.ws_in)
    return F.linear(F.silu(h[:, :Is]) * h[:, Is:], layer.ws_out)


def sort_by_expert(ids):
    """The k slots of every token sorted by expert id (stable): (flat ids [S·k], order [S·k], token of each sorted
    slot [S·k]). Sorted position j holds slot order[j], which belongs to token order[j] // k."""
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    return flat, order, torch.div(order, ids.shape[1], rounding_mode="floor")


def grouped_experts(layer, xs, offs):
    """The FFN of every expert on its rows of `xs` (rows grouped by expert, int32 cumulative row ends `offs`), with
    two `torch._grouped_mm` calls."""
    I = layer.spec.inter
    h = GROUPED_MM(xs, layer.w_in_t, offs=offs)
    h = F.silu(h[:, :I]) * h[:, I:] if layer.spec.gated else F.relu(h)
    return GROUPED_MM(h, layer.w_out_t, offs=offs)


def combine_slots(y, order, w):
    """Unpermute the expert outputs `y` (row j is slot order[j], as sort_by_expert sorted them) and sum each token's
    k slots weighted by `w` [S, k]."""
    S, k = w.shape
    yk = torch.empty(S * k, y.shape[1], dtype=y.dtype, device=y.device)
    yk.index_copy_(0, order, y)
    return yk.view(S, k, y.shape[1]).mul_(w.to(y.dtype).unsqueeze(-1)).sum(dim=1)


def expert_counts(flat, experts: int) -> list[int]:
    """Rows of each expert, on the host (the loop's one sync)."""
    return torch.bincount(flat, minlength=experts).tolist()


def routed_batches(layer: Layer, x):
    """The per-expert loops' routing: one sort by expert and one host sync for the counts; yields, per expert with
    rows, (expert, its rows' token indices, their combine weights [c, 1])."""
    ids, w = route(layer, x)
    flat, order, tok = sort_by_expert(ids)
    w_sorted = w.reshape(-1)[order]
    start = 0
    for e, c in enumerate(expert_counts(flat, layer.spec.experts)):
        if c:
            yield e, tok[start:start + c], w_sorted[start:start + c].unsqueeze(1)
        start += c


def forward_loop(layer: Layer, x):
    """Per-expert loop: one sort, one host sync for the counts, then index_select / FFN / weighted index_add_."""
    out = torch.zeros(x.shape[0], layer.spec.hidden, dtype=torch.float32, device=x.device)
    for e, idx, we in routed_batches(layer, x):
        ye = expert_ffn(layer, e, x.index_select(0, idx))
        out.index_add_(0, idx, ye.float() * we)
    if layer.ws_in is not None:
        out += shared_ffn(layer, x).float()
    return out.to(x.dtype)


def group_offsets(flat, experts: int):
    """(rows of each expert [E] int32, their cumulative ends [E] int32) for the flat expert ids, with no host sync."""
    n = flat.numel()
    counts = torch.zeros(experts, dtype=torch.int32, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones(n, dtype=torch.int32, device=flat.device))
    return counts, torch.cumsum(counts, 0, dtype=torch.int32)


def padded_rows(flat, order, counts, offs, align: int):
    """Each expert's rows start at a multiple of `align`; an empty expert still gets one block (as torchtitan does),
    so no group is empty. Returns (the padded row of each sorted slot [n] int64, the padded cumulative ends [E]
    int32); the rows fit in a buffer of n + E·align rows, a static bound: no host sync."""
    n = flat.numel()
    padded = torch.clamp_min((counts + (align - 1)) // align * align, align)
    offs_p = torch.cumsum(padded, 0, dtype=torch.int32)
    e_sorted = flat[order]
    rank = torch.arange(n, device=flat.device) - (offs - counts).long()[e_sorted]
    return (offs_p - padded).long()[e_sorted] + rank, offs_p


def forward_grouped(layer: Layer, x, align: int = 1):
    """Sort by expert, grouped GEMMs with int32 cumulative offsets (no host sync), unpermute, weighted sum."""
    E = layer.spec.experts
    ids, w = route(layer, x)
    flat, order, tok = sort_by_expert(ids)
    n = flat.numel()
    counts, offs = group_offsets(flat, E)
    xs = x.index_select(0, tok)
    dest = None
    if align > 1:
        dest, offs = padded_rows(flat, order, counts, offs, align)
        buf = x.new_zeros(n + E * align, x.shape[1])
        buf.index_copy_(0, dest, xs)
        xs = buf
    y = grouped_experts(layer, xs, offs)
    if dest is not None:
        y = y.index_select(0, dest)
    out = combine_slots(y, order, w)
    if layer.ws_in is not None:
        out = out + shared_ffn(layer, x)
    return out


# --- fp8 ---------------------------------------------------------------------------------------------------------
# E4M3 by docs/fp8.md's rule: a block's scale is amax / 448 in fp32 (1 where that is 0), a value's code is the
# fp32 quotient v / scale rounded to E4M3 (nearest even) and saturated at ±448; a code stands for code × scale.
# Codes are gathered and padded through uint8 views, so that no indexing kernel needs float8 support.


def e4m3_codes(v, scale):
    """E4M3 codes of fp32 `v` [..., g] with one fp32 scale per row of g values ([...])."""
    q = (v / scale.unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX)
    return q.to(torch.float8_e4m3fn)


def amax_scale(amax):
    """amax / 448 in fp32, 1 where that is 0."""
    s = amax.float() / FP8_MAX
    return s.masked_fill_(s == 0, 1.0)


def quantize_groups(x):
    """Per row and 128-column group: (codes [M, K] E4M3, scales [M, K/128] fp32). K is a multiple of 128."""
    M, K = x.shape
    v = x.float().view(M, K // FP8_BLOCK, FP8_BLOCK)
    s = amax_scale(v.abs().amax(dim=-1))
    return e4m3_codes(v, s).view(M, K), s


def quantize_rows(x):
    """Per row: (codes [M, K] E4M3, scales [M] fp32)."""
    v = x.float()
    s = amax_scale(v.abs().amax(dim=-1))
    return e4m3_codes(v, s), s


def quantize_weights(w, scaling: str):
    """One [E, N, K] weight tensor (any float dtype) to (codes [E, N, K] E4M3, fp32 scales): blockwise, scales
    [E, ceil(N/128), L4] with one per 128x128 block and 1.0 in the K blocks past ceil(K/128) (cuBLASLt's padded
    leading dimension); rowwise, scales [E, N], one per output channel over all of K. In chunks of experts, so that
    the fp32 scratch stays near FP8_QUANT_SCRATCH / 4."""
    E, N, K = w.shape
    codes = torch.empty(E, N, K, dtype=torch.float8_e4m3fn, device=w.device)
    if scaling == "blockwise":
        nb, kb = fp8_block_scale_shape(N, K)
        scales = torch.ones(E, nb, fp8_padded_k_blocks(K), dtype=torch.float32, device=w.device)
    else:
        scales = torch.empty(E, N, dtype=torch.float32, device=w.device)
    chunk = max(1, (FP8_QUANT_SCRATCH // 4) // (N * K * 4))
    for e0 in range(0, E, chunk):
        v = w[e0:e0 + chunk].float()
        c = v.shape[0]
        if scaling == "blockwise":
            blocks = v.view(c, nb, FP8_BLOCK, kb, FP8_BLOCK)
            s = amax_scale(blocks.abs().amax(dim=(2, 4)))  # [c, nb, kb]
            q = (blocks / s[:, :, None, :, None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            codes[e0:e0 + c] = q.view(c, N, K)
            scales[e0:e0 + c, :, :kb] = s
        else:
            s = amax_scale(v.abs().amax(dim=-1))  # [c, N]
            codes[e0:e0 + c] = e4m3_codes(v, s)
            scales[e0:e0 + c] = s
        del v
    return codes, scales


def dequantize_weights(codes, scales, scaling: str):
    """float64 values of one expert matrix's codes [N, K] and scales (blockwise [N/128, L4], rowwise [N])."""
    N, K = codes.shape
    v = codes.double()
    if scaling == "rowwise":
        return v * scales.double().unsqueeze(1)
    nb, kb = fp8_block_scale_shape(N, K)
    s = scales[:, :kb].double()
    return (v.view(nb, FP8_BLOCK, kb, FP8_BLOCK) * s[:, None, :, None]).view(N, K)


def fake_quantize(x, scaling: str):
    """float64 values code × scale of activations x [M, K] quantized as `scaling` quantizes them (1x128 groups for
    blockwise, whole rows for rowwise)."""
    if scaling == "rowwise":
        q, s = quantize_rows(x)
        return q.double() * s.double().unsqueeze(1)
    q, s = quantize_groups(x)
    M, K = x.shape
    return (q.double().view(M, K // FP8_BLOCK, FP8_BLOCK) * s.double().unsqueeze(-1)).view(M, K)


def as_u8(t):
    return t.view(torch.uint8)


def as_e4m3(t):
    return t.view(torch.float8_e4m3fn)


class Fp8Layer:
    """The fp8 layer made from a bf16 `Layer` (the same random weights): the router and shared expert stay bf16,
    the routed experts' weights become E4M3 codes with fp32 scales, blockwise (loop) and/or rowwise (grouped).
    `w_in` / `w_out` are the bf16 weights while they are kept (reference_layer, the check against the unquantized
    layer); drop_bf16_experts() frees them once the checks ran."""

    def __init__(self, base: Layer, scalings):
        spec = base.spec
        problem = fp8_shape_problem(spec)
        if problem:
            raise BenchError(problem)
        self.spec, self.device, self.dtype = spec, base.device, base.dtype
        self.base = base
        self.wg, self.bias, self.ws_in, self.ws_out = base.wg, base.bias, base.ws_in, base.ws_out
        self.scalings = tuple(scalings)
        self.q = {}  # scaling -> (w_in codes, w_in scales, w_out codes, w_out scales)
        for sc in self.scalings:
            self.q[sc] = quantize_weights(base.w_in, sc) + quantize_weights(base.w_out, sc)
        if "rowwise" in self.q:
            # torch._scaled_grouped_mm's mat_b is [E, K, N] column-major: the transposed views of [E, N, K].
            w_in_q, _, w_out_q, _ = self.q["rowwise"]
            self.w_in_rq_t, self.w_out_rq_t = w_in_q.transpose(1, 2), w_out_q.transpose(1, 2)

    @property
    def w_in(self):
        return self.base.w_in

    @property
    def w_out(self):
        return self.base.w_out

    def drop_bf16_experts(self) -> None:
        self.base.w_in = self.base.w_out = self.base.w_in_t = self.base.w_out_t = None

    def weight_bytes(self) -> int:
        ts = [self.wg, self.bias, self.ws_in, self.ws_out, self.base.w_in, self.base.w_out]
        ts += [t for q in self.q.values() for t in q]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def activation(layer, h):
    I = layer.spec.inter
    return F.silu(h[:, :I]) * h[:, I:] if layer.spec.gated else F.relu(h)


def scaled_mm_blockwise(a, scale_a, codes, scales, out_dtype=None):
    """a [M, K] E4M3 (row-major) times one expert matrix's codes [N, K]ᵀ, [M, N] in `out_dtype` (bf16 unless
    given): F.scaled_mm with BlockWise1x128 scales for a (scale_a [M, K/128], strides (1, M)) and BlockWise128x128
    for the weight (its stored [N/128, L4] scales transposed: [L4, N/128], strides (1, L4)), no fast accumulation
    (torch refuses it with block scales)."""
    st, sw = F.ScalingType, F.SwizzleType
    return F.scaled_mm(a, codes.t(), scale_a, st.BlockWise1x128, scales.t(), st.BlockWise128x128,
                       swizzle_a=sw.NO_SWIZZLE, swizzle_b=sw.NO_SWIZZLE,
                       output_dtype=out_dtype or torch.bfloat16)


def outer_dim_major(s):
    """The same [M, G] values with strides (1, M), as BlockWise1x128 wants them. (s.t().contiguous().t() is not
    enough: for M = 1 the transpose already counts as contiguous and keeps strides (G, 1), which torch refuses.)"""
    M, G = s.shape
    return torch.empty_strided((M, G), (1, M), dtype=s.dtype, device=s.device).copy_(s)


def forward_loop_fp8(layer: Fp8Layer, x, row_align: int = 4):
    """The per-expert loop at fp8, blockwise (DeepSeek-V3's scaling, and FlashMoE's arithmetic): x quantized once
    per token and 128-channel group, then per expert its rows' codes and scales gathered (and padded to `row_align`
    rows), GEMM0 with fp32 output, the activation in fp32, h rounded to bf16 and quantized per row and group, GEMM1
    (bf16 out), and the weighted index_add_ into fp32. (GEMM0's output in bf16 would move ~3 % of h's codes by one
    step, which the unit tests measure as 1.6e-2 against the float64 layer on the same codes, 1.7e-3 this way.)"""
    w_in_q, w_in_s, w_out_q, w_out_s = layer.q["blockwise"]
    xq, xs = quantize_groups(x)
    xq8 = as_u8(xq)
    xs_t = xs.t().contiguous()  # [H/128, S]: an expert's columns of it, transposed, are outer-dim-major
    out = torch.zeros(x.shape[0], layer.spec.hidden, dtype=torch.float32, device=x.device)
    for e, idx, we in routed_batches(layer, x):
        c = idx.numel()
        a, sa = xq8.index_select(0, idx), xs_t.index_select(1, idx)
        pad = (-c) % row_align
        if pad:
            a, sa = F.pad(a, (0, 0, 0, pad)), F.pad(sa, (0, pad), value=1.0)
        h = activation(layer, SCALED_MM(as_e4m3(a), sa.t(), w_in_q[e], w_in_s[e], torch.float32))
        hq, hs = quantize_groups(h.to(torch.bfloat16))
        ye = SCALED_MM(hq, outer_dim_major(hs), w_out_q[e], w_out_s[e])
        out.index_add_(0, idx, ye[:c].float() * we)
    if layer.ws_in is not None:
        out += shared_ffn(layer, x).float()
    return out.to(x.dtype)


def forward_grouped_fp8(layer: Fp8Layer, x, align: int = 1):
    """Grouped at fp8, rowwise: x quantized once per token, sorted by expert (padded to `align` rows per expert as
    forward_grouped does), two torch._scaled_grouped_mm calls (2d x 3d, int32 offsets, bf16 out: the only output
    it has; no fast accumulation) with the activation in bf16 and h quantized per row between them, unpermute and
    the weighted sum in fp32. No host sync."""
    E = layer.spec.experts
    _, w_in_s, _, w_out_s = layer.q["rowwise"]
    ids, w = route(layer, x)
    flat, order, tok = sort_by_expert(ids)
    n = flat.numel()
    counts, offs = group_offsets(flat, E)
    xq, xs = quantize_rows(x)
    a, sa = as_u8(xq).index_select(0, tok), xs.index_select(0, tok)
    dest = None
    if align > 1:
        dest, offs = padded_rows(flat, order, counts, offs, align)
        buf = a.new_zeros(n + E * align, a.shape[1])
        buf.index_copy_(0, dest, a)
        sbuf = sa.new_ones(n + E * align)
        sbuf.index_copy_(0, dest, sa)
        a, sa = buf, sbuf
    h = SCALED_GROUPED_MM(as_e4m3(a), layer.w_in_rq_t, sa, w_in_s, offs=offs, out_dtype=torch.bfloat16,
                          use_fast_accum=False)
    hq, hs = quantize_rows(activation(layer, h))
    y = SCALED_GROUPED_MM(hq, layer.w_out_rq_t, hs, w_out_s, offs=offs, out_dtype=torch.bfloat16,
                          use_fast_accum=False)
    if dest is not None:
        y = y.index_select(0, dest)
    out = combine_slots(y.float(), order, w)
    if layer.ws_in is not None:
        out += shared_ffn(layer, x).float()
    return out.to(x.dtype)


def forward_fp8(impl: str, layer: Fp8Layer, x, align: int = 1, row_align: int = 4):
    if impl == "loop":
        return forward_loop_fp8(layer, x, row_align)
    return forward_grouped_fp8(layer, x, align)


# --- correctness checks -------------------------------------------------------------------------------------------


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def reference_layer(layer: Layer, x, ids, w):
    """float64 layer for given routing: per expert (grouped in Python), weights upcast to float64."""
    spec = layer.spec
    xd = x.double()
    out = torch.zeros(x.shape[0], spec.hidden, dtype=torch.float64, device=x.device)
    pairs = defaultdict(list)
    for t, (row_ids, row_w) in enumerate(zip(ids.tolist(), w.double().tolist())):
        for e, we in zip(row_ids, row_w):
            pairs[e].append((t, we))
    I = spec.inter
    for e, lst in sorted(pairs.items()):
        toks = torch.tensor([t for t, _ in lst], device=x.device)
        ws = torch.tensor([v for _, v in lst], dtype=torch.float64, device=x.device)
        h = xd[toks] @ layer.w_in[e].double().T
        h = torch.nn.functional.silu(h[:, :I]) * h[:, I:] if spec.gated else torch.relu(h)
        out.index_add_(0, toks, (h @ layer.w_out[e].double().T) * ws[:, None])
    if layer.ws_in is not None:
        Is = spec.shared_inter
        h = xd @ layer.ws_in.double().T
        out += (torch.nn.functional.silu(h[:, :Is]) * h[:, Is:]) @ layer.ws_out.double().T
    return out


def check_router(layer: Layer, logits) -> list[str]:
    """The vectorised router against benchlib's per-token float64 reference on the same fp32 logits."""
    spec = layer.spec
    ids, w = route_from_logits(layer, logits)
    L = logits.double().tolist()
    bias = layer.bias.double().tolist() if layer.bias is not None else None
    wrong, ties, worst = 0, 0, 0.0
    for t, (gi, gw) in enumerate(zip(ids.tolist(), w.double().tolist())):
        if spec.router == "softmax":
            ri, rw, rs = benchlib.reference_softmax_topk(L[t], spec.top_k)
        else:
            ri, rw, rs = benchlib.reference_deepseek_route(
                L[t], bias, spec.top_k, spec.groups, spec.groups_kept, spec.scaling)
        same, tie, err = benchlib.compare_routes(gi, gw, ri, rw, rs)
        wrong += not same and not tie
        ties += not same and tie
        if same:
            worst = max(worst, err)
    msg = (f"router ({spec.router}) vs float64 reference: {logits.shape[0]} tokens, {wrong} wrong choices, "
           f"{ties} near-tie flips, max weight error {worst:.2e}")
    log("  check " + msg)
    bad = []
    if wrong:
        bad.append(msg)
    if worst > TOL_ROUTE_WEIGHT * max(1.0, spec.scaling):
        bad.append(msg + f" (limit {TOL_ROUTE_WEIGHT * max(1.0, spec.scaling):.0e})")
    return bad


def run_checks(layer: Layer, precision: str, tokens: int, seed: int, impls: list[str], align: int) -> list[str]:
    """Router, loop and grouped checks on one random input; returns the failures. Grouped is tried unpadded and
    with 8-row padding; only a failure of the `align` that will be timed counts (the other one is a warning)."""
    g = torch.Generator(device=layer.device)
    g.manual_seed(seed + 7)
    x = torch.randn(tokens, layer.spec.hidden, dtype=layer.dtype, device=layer.device, generator=g)
    bad = check_router(layer, gate_logits(layer, x))
    ids, w = route(layer, x)
    ref = reference_layer(layer, x, ids, w)
    loop = forward_loop(layer, x)
    e = rel_err(loop, ref)
    log(f"  check loop {precision} vs float64: rel. error {e:.2e} (limit {TOL_VS_FP64[precision]:.0e})")
    if not e <= TOL_VS_FP64[precision]:
        bad.append(f"loop {precision} vs float64 rel. error {e:.2e}")
    if precision == "bf16" and "grouped" in impls:
        for a in sorted({1, 8, align}):
            out = forward_grouped(layer, x, a)
            e1, e2 = rel_err(out, loop), rel_err(out, ref)
            ok = e1 <= TOL_GROUPED_VS_LOOP and e2 <= TOL_VS_FP64["bf16"]
            log(f"  check grouped (align {a}) vs loop: rel. error {e1:.2e}, vs float64 {e2:.2e} "
                f"(limit {TOL_GROUPED_VS_LOOP:.0e}){'' if ok else ' MISMATCH'}")
            if not ok:
                msg = f"grouped align {a}: rel. error {e1:.2e} vs loop, {e2:.2e} vs float64"
                if a == align:
                    bad.append(msg + (" (try --group-align 8)" if a == 1 else ""))
                else:
                    log(f"  warning: {msg} (not the timed --group-align {align})")
    return bad


#: What an fp8 API raises where it is not supported (a TORCH_CHECK_VALUE is a ValueError, _NOT_IMPLEMENTED a
#: NotImplementedError, the rest RuntimeError); such a case is skipped, not failed.
FP8_ERRORS = (RuntimeError, ValueError, NotImplementedError, TypeError)


def pow2_pattern(shape, device):
    """Powers of two 2^-2..2^2 that differ between neighbours along every dimension of `shape` (exact factors:
    multiplying by them and dividing again restores every fp32 or bf16 value)."""
    t = torch.zeros(shape, dtype=torch.int64, device=device)
    for d, n in enumerate(shape):
        view = [1] * len(shape)
        view[d] = n
        t = t + (d + 1) * torch.arange(n, device=device).view(view)
    return torch.exp2((t % 5 - 2).float())


@contextlib.contextmanager
def distorted_scales(layer: Fp8Layer, scaling: str):
    """The weight scales of `scaling` multiplied by pow2_pattern inside the block (exactly undone after): the
    random layer's blocks all have nearly the same amax, so without this a scale read from the wrong block or row
    would change the output by only ~1e-4 (docs/fp8.md says the same of FlashMoE's verify weights)."""
    scales = [layer.q[scaling][1], layer.q[scaling][3]]
    factors = [pow2_pattern(tuple(s.shape), s.device) for s in scales]
    for s, f in zip(scales, factors):
        s.mul_(f)
    try:
        yield
    finally:
        for s, f in zip(scales, factors):
            s.div_(f)


def pairs_by_expert(ids, w) -> dict:
    """{expert: [(token, weight)]} of a routing, in Python (the references' grouping)."""
    pairs = defaultdict(list)
    for t, (row_ids, row_w) in enumerate(zip(ids.tolist(), w.double().tolist())):
        for e, we in zip(row_ids, row_w):
            pairs[e].append((t, we))
    return pairs


def reference_fp8(layer: Fp8Layer, x, ids, w, scaling: str):
    """float64 layer on the fp8 layer's own codes and scales for given routing: x quantized by `scaling`'s rule,
    dequantized weights, the activation in float64, h rounded to bf16 and quantized by the same rule (FlashMoE's
    order), float64 sums; the shared expert on its bf16 weights."""
    spec = layer.spec
    w_in_q, w_in_s, w_out_q, w_out_s = layer.q[scaling]
    xq = fake_quantize(x, scaling)
    out = torch.zeros(x.shape[0], spec.hidden, dtype=torch.float64, device=x.device)
    I = spec.inter
    for e, lst in sorted(pairs_by_expert(ids, w).items()):
        toks = torch.tensor([t for t, _ in lst], device=x.device)
        ws = torch.tensor([v for _, v in lst], dtype=torch.float64, device=x.device)
        h = xq[toks] @ dequantize_weights(w_in_q[e], w_in_s[e], scaling).T
        h = torch.nn.functional.silu(h[:, :I]) * h[:, I:] if spec.gated else torch.relu(h)
        hq = fake_quantize(h.to(torch.bfloat16), scaling)
        out.index_add_(0, toks, (hq @ dequantize_weights(w_out_q[e], w_out_s[e], scaling).T) * ws[:, None])
    if layer.ws_in is not None:
        Is = spec.shared_inter
        h = x.double() @ layer.ws_in.double().T
        out += (torch.nn.functional.silu(h[:, :Is]) * h[:, Is:]) @ layer.ws_out.double().T
    return out


def fp8_check_input(tokens: int, hidden: int, seed: int, device):
    """The fp8 checks' input: bf16 normal values, each (token, 128-channel group) times a power of two 2^-2..2^2,
    so that the activations' scales differ between neighbouring groups and tokens."""
    g = torch.Generator(device=device)
    g.manual_seed(seed + 7)
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16, device=device, generator=g)
    f = pow2_pattern((tokens, hidden // FP8_BLOCK), device).repeat_interleave(FP8_BLOCK, dim=1)
    return (x.float() * f).to(torch.bfloat16)


def run_checks_fp8(layer: Fp8Layer, tokens: int, seed: int, impls: list[str], align: int,
                   row_align: int) -> tuple[list[str], dict[str, str]]:
    """The router check, then each implementation against reference_fp8 (scales distorted, TOL_VS_FP64["fp8"]) and
    against the unquantized bf16 layer (TOL_FP8_VS_UNQUANTIZED); grouped at align 1, 16 and `align`, of which only
    the timed `align` counts. Returns (the failures, {implementation: why it is unsupported} for those whose API
    raised)."""
    x = fp8_check_input(tokens, layer.spec.hidden, seed, layer.device)
    bad = check_router(layer, gate_logits(layer, x))
    ids, w = route(layer, x)
    ref = reference_layer(layer, x, ids, w)
    unsupported: dict[str, str] = {}
    for impl in impls:
        scaling = FP8_SCALING[impl]
        ref_d = None  # the float64 layer on the distorted scales, the same for every align
        for a in [align] if impl == "loop" else sorted({1, 16, align}):
            timed = impl == "loop" or a == align
            label = f"{impl} fp8 ({scaling}" + (f", row align {row_align})" if impl == "loop" else f", align {a})")
            try:
                out = forward_fp8(impl, layer, x, a, row_align)
                with distorted_scales(layer, scaling):
                    out_d = forward_fp8(impl, layer, x, a, row_align)
                    if ref_d is None:
                        ref_d = reference_fp8(layer, x, ids, w, scaling)
            except FP8_ERRORS as ex:
                reason = f"{type(ex).__name__}: {first_line(ex)}"
                if timed:
                    unsupported[impl] = reason
                    log(f"  check {label} raised {reason}: its cases are skipped")
                    break
                log(f"  warning: check {label} raised {reason} (not the timed --group-align {align})")
                continue
            e_q, e_u = rel_err(out_d, ref_d), rel_err(out, ref)
            ok = e_q <= TOL_VS_FP64["fp8"] and e_u <= TOL_FP8_VS_UNQUANTIZED
            log(f"  check {label}: vs float64 on its codes and scales {e_q:.2e} (limit {TOL_VS_FP64['fp8']:.0e}), "
                f"vs the unquantized bf16 layer {e_u:.2e} (limit {TOL_FP8_VS_UNQUANTIZED:.1e})"
                f"{'' if ok else ' MISMATCH'}")
            if not ok:
                msg = f"{label}: rel. error {e_q:.2e} vs float64 on its codes and scales, {e_u:.2e} vs unquantized"
                if timed:
                    bad.append(msg)
                else:
                    log(f"  warning: {msg} (not the timed --group-align {align})")
    return bad, unsupported


def probe_fp8(device, impls, row_align: int = 4) -> dict[str, str]:
    """{implementation: why it cannot run fp8 here} for the implementations among `impls` whose API is missing or
    raises on a small layer (H = 256, I = 128, E = 4, k = 2, 8 tokens), by the same code paths the timed layer
    takes."""
    out = {}
    if "loop" in impls and SCALED_MM is None:
        out["loop"] = f"torch {torch.__version__} has no torch.nn.functional.scaled_mm (block scales)"
    if "grouped" in impls and SCALED_GROUPED_MM is None:
        out["grouped"] = f"torch {torch.__version__} has no torch._scaled_grouped_mm"
    todo = [i for i in IMPLS if i in impls and i not in out]
    if not todo:
        return out
    spec = dataclasses.replace(PRESETS["qwen3-30b-a3b"], hidden=256, inter=128, experts=4, top_k=2)
    try:
        layer = Fp8Layer(Layer(spec, torch.bfloat16, device, 5), fp8_scalings(todo))
        x = torch.randn(8, spec.hidden, dtype=torch.bfloat16, device=device)
    except FP8_ERRORS as ex:
        return {**out, **{i: f"{type(ex).__name__}: {first_line(ex)}" for i in todo}}
    for impl in todo:
        try:
            forward_fp8(impl, layer, x, 1, row_align)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except FP8_ERRORS as ex:
            out[impl] = f"{type(ex).__name__}: {first_line(ex)}"
    return out


# --- timing ------------------------------------------------------------------------------------------------------


def time_calls(fn, inputs: list, warmup: int, repeats: int, before_each=None, cuda: bool = True) -> list[float]:
    """Milliseconds of each of `repeats` calls, CUDA events around the call, the GPU idle before each.
    `before_each` runs before every timed call (the expert-parallel baseline's barrier); `cuda=False` times with
    perf_counter instead (its CPU mode)."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    sync()
    times = []
    for r in range(repeats):
        x = inputs[r % len(inputs)]
        if before_each is not None:
            before_each()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(x)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            out = fn(x)
            times.append((time.perf_counter() - t0) * 1e3)
        del out
    return times


def measure_rates(device) -> dict[str, float]:
    """Best-of-10 matmul TFLOP/s at 8192³ (bf16, TF32, and plain fp32 to prove TF32 is on) and device copy GB/s
    (read + write) on 2 GiB."""
    n = 8192
    rates = {}
    for name, dt, tf32 in (("bf16_tflops", torch.bfloat16, True), ("tf32_tflops", torch.float32, True),
                           ("fp32_tflops", torch.float32, False)):
        set_tf32(tf32)
        a = torch.randn(n, n, dtype=dt, device=device)
        b = torch.randn(n, n, dtype=dt, device=device)
        t = min(time_calls(lambda _: torch.mm(a, b), [None], 3, 10))
        rates[name] = 2 * n ** 3 / (t * 1e-3) / 1e12
        del a, b
    set_tf32(True)
    if rates["tf32_tflops"] < 1.5 * rates["fp32_tflops"]:
        log(f"warning: TF32 matmul ({rates['tf32_tflops']:.0f} TFLOP/s) is not faster than fp32 "
            f"({rates['fp32_tflops']:.0f}): TF32 seems off, the tf32 cases would measure fp32")
    nbytes = 2 << 30
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = min(time_calls(lambda _: dst.copy_(src), [None], 3, 10))
    rates["copy_gbps"] = 2 * nbytes / (t * 1e-3) / 1e9
    del src, dst
    torch.cuda.empty_cache()
    return rates


def measure_fp8_rate(device, bf16_tflops: float) -> tuple[float, str]:
    """(TFLOP/s, how it was had) of the fastest fp8 GEMM torch has: best of 10 8192³ E4M3 torch._scaled_mm with
    per-tensor scales, bf16 out and fast accumulation. Where it raises: twice the bf16 rate (FlashMoE's
    Roofline.swift takes the same), and a note that says so."""
    n = 8192
    try:
        a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
        b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
        one = torch.ones((), dtype=torch.float32, device=device)
        t = min(time_calls(lambda _: torch._scaled_mm(a, b.t(), one, one, out_dtype=torch.bfloat16,
                                                      use_fast_accum=True), [None], 3, 10))
        del a, b
        return 2 * n ** 3 / (t * 1e-3) / 1e12, "measured"
    except FP8_ERRORS as e:
        return 2 * bf16_tflops, f"2 x bf16 (the fp8 GEMM raised {type(e).__name__}: {first_line(e)})"


def experts_touched(layer: Layer, inputs: list) -> float:
    """Mean over the input sets of the number of experts with at least one token."""
    vals = []
    for x in inputs:
        ids, _ = route(layer, x)
        vals.append(int((torch.bincount(ids.reshape(-1), minlength=layer.spec.experts) > 0).sum()))
    return statistics.mean(vals)


# ---------------------------------------------------------------------------------------------------------------


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def free_memory() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def save_json(path: str | None, results: list[dict]) -> None:
    if path:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
        os.replace(tmp, path)


def precision_label(r: dict) -> str:
    """The precision as the log and the summary table show it: fp8 with its scaling (fp8/block, fp8/row)."""
    if r["precision"] != "fp8":
        return r["precision"]
    return "fp8/" + {"blockwise": "block", "rowwise": "row"}.get(r.get("scaling"), "?")


def fp8_record(impl: str, row_align: int, fp8_rate: str | None) -> dict:
    """The fields an fp8 record adds: how it scales, through which API, and where its floor's rate came from."""
    scaling = FP8_SCALING[impl]
    return {"scaling": scaling, "scaling_detail": FP8_SCALING_TEXT[scaling], "fp8_api": FP8_API[impl],
            "fast_accum": False, "row_align": row_align if impl == "loop" else None,
            "fp8_rate": fp8_rate or "measured"}


def case_line(r: dict) -> str:
    """The one compact line printed for each timed case."""
    return (f"  {r['preset']:<14} S={r['tokens']:<5} {r['impl']:<7} {precision_label(r)}: median "
            f"{r['median_ms']:8.3f} ms  min {r['min_ms']:8.3f} ms  {r['tflops']:6.1f} TFLOP/s  floor "
            f"{r['floor_ms']:.3f} ms  ({r['median_ms'] / r['floor_ms']:.1f}x floor, "
            f"{r['experts_touched']:.0f} experts touched)")


def run(args: argparse.Namespace) -> int:
    device = load_torch(args.device)
    props = torch.cuda.get_device_properties(device)
    log(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {props.name} (sm_{props.major}{props.minor}, "
        f"{props.total_memory / 2**30:.0f} GiB)")
    build = precisions_to_build(args)
    if "grouped" in args.impls and "bf16" in build:
        if GROUPED_MM is None:
            raise BenchError(f"torch {torch.__version__} has neither torch._grouped_mm nor F.grouped_mm: "
                             f"use --impls loop or torch >= 2.8")
        if props.major < 9:
            log("warning: _grouped_mm's CUTLASS path needs sm_90+; on this GPU it loops over groups internally")
    if args.repeats < 20:
        log(f"warning: --repeats {args.repeats} < 20; the brief's method asks for at least 20")
    if args.input_sets < 2:
        log("warning: --input-sets 1 may measure a warm L2 rather than the layer")

    skipped: list[str] = []
    fp8_unsupported: dict[str, str] = {}
    if "fp8" in build:
        with torch.inference_mode():
            fp8_unsupported = probe_fp8(device, args.impls, args.fp8_row_align)
        for impl in (i for i in IMPLS if i in args.impls):
            what = f"{impl} {FP8_SCALING[impl]} ({FP8_SCALING_TEXT[FP8_SCALING[impl]]}) via {FP8_API[impl]}"
            log(f"fp8 {what}: " + (f"UNSUPPORTED, {fp8_unsupported[impl]}" if impl in fp8_unsupported else "ok"))
        skipped += [f"*:{i}:fp8 ({r})" for i, r in fp8_unsupported.items()]
        free_memory()

    t0 = time.time()
    rates = measure_rates(device)
    fp8_rate = None
    if "fp8" in build:
        rates["fp8_tflops"], fp8_rate = measure_fp8_rate(device, rates["bf16_tflops"])
        free_memory()
    log(f"rates: bf16 {rates['bf16_tflops']:.0f} TFLOP/s, tf32 {rates['tf32_tflops']:.0f} TFLOP/s, "
        f"fp32 {rates['fp32_tflops']:.0f} TFLOP/s, "
        + (f"fp8 {rates['fp8_tflops']:.0f} TFLOP/s ({fp8_rate}), " if fp8_rate else "")
        + f"copy {rates['copy_gbps']:.0f} GB/s  ({time.time() - t0:.1f} s)")

    results: list[dict] = []
    failures: list[str] = []
    with torch.inference_mode():
        for name in args.presets:
            spec = PRESETS[name]
            token_list = args.tokens or list(spec.tokens)
            # The check needs bf16 weights when grouped is checked; build them even if bf16 is not timed.
            for prec in build:
                impls, checking, left_out = plan_case(args, name, prec)
                skipped += left_out
                if prec == "fp8":
                    impls = [i for i in impls if i not in fp8_unsupported]
                    checking = checking and bool(impls)
                    problem = fp8_shape_problem(spec)
                    if problem and impls:
                        skipped += [f"{name}:{i}:fp8 ({problem})" for i in impls]
                        log(f"SKIP {name} fp8: {problem}")
                        continue
                if not impls and not checking:
                    continue
                need = weight_bytes_estimate(spec, prec, impls) + max(
                    workspace_estimate(spec, prec, s, args.input_sets, args.group_align)
                    for s in token_list + [args.check_tokens])
                free, _ = torch.cuda.mem_get_info(device)
                if need > 0.95 * free:
                    msg = (f"{name} {prec}: needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free "
                           f"(use --skip {name}::{prec} or fewer --tokens)")
                    log("SKIP " + msg)
                    skipped.append(msg)
                    continue
                t1 = time.time()
                error = None
                try:
                    layer = Layer(spec, dtype_of(prec), device, args.seed)
                    if prec == "fp8":
                        layer = Fp8Layer(layer, fp8_scalings(impls))
                    torch.cuda.synchronize()
                except RuntimeError as e:  # torch.OutOfMemoryError is one
                    error = f"{name} {prec}: building the weights failed: {first_line(e)}"
                if error:  # outside the except block, so the traceback's tensors can be freed
                    failures.append(error)
                    log(f"ERROR {error}")
                    free_memory()
                    continue
                log(f"== {name} {prec}: weights {layer.weight_bytes() / 1e9:.2f} GB ({time.time() - t1:.1f} s)")
                if checking:
                    unsupported: dict[str, str] = {}
                    try:
                        if prec == "fp8":
                            bad, unsupported = run_checks_fp8(layer, args.check_tokens, args.seed, impls,
                                                              args.group_align, args.fp8_row_align)
                        else:
                            bad = run_checks(layer, prec, args.check_tokens, args.seed, args.impls, args.group_align)
                    except RuntimeError as e:
                        bad = [f"the check raised {type(e).__name__}: {first_line(e)}"]
                    skipped += [f"{name}:{i}:{prec} ({r})" for i, r in unsupported.items()]
                    impls = [i for i in impls if i not in unsupported]
                    failures += [f"{name} {prec}: {b}" for b in bad]
                    for b in bad:
                        log(f"  CHECK FAILED: {b}")
                    if bad:
                        # Numbers from a layer that computes the wrong thing would only mislead.
                        skipped += [f"{name}:{i}:{prec} (check failed)" for i in impls]
                        impls = []
                if prec == "fp8":
                    layer.drop_bf16_experts()
                    free_memory()
                for S in token_list if impls else []:
                    g = torch.Generator(device=device)
                    g.manual_seed(args.seed + S)
                    inputs = [torch.randn(S, spec.hidden, dtype=layer.dtype, device=device, generator=g)
                              for _ in range(args.input_sets)]
                    touched = experts_touched(layer, inputs)
                    flops = benchlib.layer_flops(spec, S)
                    nbytes = benchlib.layer_bytes(spec, S, touched, benchlib.STORAGE_BYTES[prec],
                                                  expert_bytes=benchlib.ELEMENT_BYTES[prec])
                    floor = benchlib.floor_ms(flops, nbytes, rates[f"{prec}_tflops"], rates["copy_gbps"])
                    for impl in impls:
                        if prec == "fp8":
                            fn = (lambda x, impl=impl: forward_fp8(impl, layer, x, args.group_align,
                                                                   args.fp8_row_align))
                        elif impl == "loop":
                            fn = lambda x: forward_loop(layer, x)  # noqa: E731
                        else:
                            fn = lambda x: forward_grouped(layer, x, args.group_align)  # noqa: E731
                        skip = None
                        try:
                            times = time_calls(fn, inputs, args.warmup, args.repeats)
                        except FP8_ERRORS as e:
                            if prec != "fp8" and not isinstance(e, RuntimeError):
                                raise
                            msg = f"{name} S={S} {impl} {prec}: {type(e).__name__}: {first_line(e)}"
                            if prec == "fp8":
                                skip = msg
                            else:
                                error = msg
                        if error or skip:
                            if error:
                                failures.append(error)
                            else:
                                skipped.append(skip)
                            log(f"{'ERROR' if error else 'SKIP'} {error or skip}")
                            error = None
                            free_memory()
                            continue
                        med, mn = statistics.median(times), min(times)
                        r = {
                            "preset": name, "tokens": S, "impl": impl, "precision": prec,
                            "median_ms": med, "min_ms": mn, "tflops": flops / (med * 1e-3) / 1e12,
                            "floor_ms": floor, "backend": "torch", "flops": flops, "bytes": nbytes,
                            "experts_touched": touched, "repeats": args.repeats, "warmup": args.warmup,
                            "input_sets": args.input_sets,
                            "group_align": args.group_align if impl == "grouped" else None,
                            "device": props.name, "torch": torch.__version__,
                            "rates": {k: round(v, 1) for k, v in rates.items()},
                        }
                        if prec == "fp8":
                            r.update(fp8_record(impl, args.fp8_row_align, fp8_rate))
                        results.append(r)
                        save_json(args.json, results)  # after every case, so a crash keeps what was measured
                        log(case_line(r))
                    del inputs
                del layer
                free_memory()

    rows = [[r["preset"], str(r["tokens"]), r["impl"], precision_label(r), benchlib.fmt_ms(r["median_ms"]),
             benchlib.fmt_ms(r["min_ms"]), f"{r['tflops']:.1f}", benchlib.fmt_ms(r["floor_ms"]),
             f"{r['median_ms'] / r['floor_ms']:.1f}x"] for r in results]
    log("")
    log(benchlib.text_table(
        ["preset", "tokens", "impl", "prec", "median ms", "min ms", "TFLOP/s", "floor ms", "vs floor"], rows))
    log(f"rates: bf16 {rates['bf16_tflops']:.0f} TFLOP/s, tf32 {rates['tf32_tflops']:.0f} TFLOP/s, "
        + (f"fp8 {rates['fp8_tflops']:.0f} TFLOP/s ({fp8_rate}), " if fp8_rate else "")
        + f"copy {rates['copy_gbps']:.0f} GB/s; median of {args.repeats} after {args.warmup} warm-up, "
        f"{args.input_sets} input sets; total {time.time() - t0:.0f} s")
    for s in skipped:
        log(f"skipped: {s}")
    if args.json:
        save_json(args.json, results)
        log(f"wrote {len(results)} results to {args.json}")
    if failures:
        log(f"{len(failures)} FAILURE(S):")
        for b in failures:
            log(f"  {b}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
