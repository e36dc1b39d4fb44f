#!/usr/bin/env python3
"""PyTorch baselines for FlashMoE: a whole MoE layer (router GEMM + softmax/sigmoid top-k + dispatch + experts +
weighted combine) timed on one GPU, in two implementations.

- `loop`: a per-expert Python loop (tokens sorted by expert once, one host sync for the counts, then per expert:
  index_select its tokens, the FFN GEMMs, index_add_ of the weighted output into an fp32 accumulator). Runs in TF32
  (fp32 tensors, TF32 matmuls enabled) and in bf16.
- `grouped`: bf16 with `torch._grouped_mm` (tokens sorted by expert, offsets = int32 cumulative counts, no host
  sync; optional per-expert padding with `--group-align`), then unpermute and a weighted sum over the k slots.

Timing: CUDA events around one whole layer call, the GPU idle before each call (so host launch overhead is in the
number, as it is in any caller's), ≥ 5 warm-up calls, median and min of ≥ 20 timed calls, rotating among ≥ 2
input sets. The floor for each case is max(FLOPs / matmul rate, bytes / copy bandwidth) with rates measured at
startup on the same device (best of 10: 8192³ bf16 and TF32 matmul, a 2 GiB device-to-device copy counting read +
write bytes; a plain-fp32 matmul is measured too, to prove TF32 is really on).

Example (GPU host):  PYTHONUNBUFFERED=1 python3 Benchmarks/torch_moe_baseline.py --check --json torch.json
Run `--help` for the options. Needs torch >= 2.8 with CUDA (`torch._grouped_mm`); tested against the API of 2.11.
"""

from __future__ import annotations

import argparse
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
PRECISIONS = ("tf32", "bf16")
#: Relative (Frobenius) error limits of `--check`.
TOL_VS_FP64 = {"tf32": 1e-2, "bf16": 2.5e-2}
TOL_GROUPED_VS_LOOP = 2.5e-2
TOL_ROUTE_WEIGHT = 1e-4


class BenchError(Exception):
    """A problem the user can fix; main() prints the message and exits with status 2."""


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Command line (no torch needed: the unit tests exercise it on a machine without a GPU).


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time PyTorch MoE layers (per-expert loop, torch._grouped_mm) for FlashMoE's presets.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--presets", default=",".join(PRESETS), help="comma list of presets")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma list of implementations: loop, grouped")
    p.add_argument("--precisions", default=",".join(PRECISIONS),
                   help="comma list: tf32 (fp32 tensors, TF32 matmuls), bf16; grouped runs bf16 only")
    p.add_argument("--tokens", default=None,
                   help="token counts for every preset, comma list (default: each preset's own, e.g. 4096,64)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per case (median and min reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls per case before timing")
    p.add_argument("--input-sets", type=int, default=2, help="distinct random inputs rotated through (>= 2)")
    p.add_argument("--group-align", type=int, default=1,
                   help="grouped: pad each expert's rows to a multiple of this (empty experts get one block); "
                        "1 = no padding")
    p.add_argument("--skip", default="",
                   help="comma list of PRESET[:IMPL[:PRECISION]] patterns (shell wildcards; an empty part "
                        "matches all) to leave out, e.g. deepseek-v3:loop:tf32 or deepseek-v3::tf32")
    p.add_argument("--check", action="store_true",
                   help="before timing each preset: compare routers with a per-token float64 reference, the loop "
                        "with a float64 layer, grouped (align 1, 8 and --group-align) with the loop; a failure skips that "
                        "preset's timing and makes the exit status 1")
    p.add_argument("--check-tokens", type=int, default=96, help="token count of the --check runs")
    p.add_argument("--seed", type=int, default=1234, help="seed of the weights and inputs")
    p.add_argument("--json", default=None, metavar="FILE", help="write the results as a JSON list to FILE")
    p.add_argument("--device", default="cuda:0", help="torch device")
    args = p.parse_args(argv)
    try:
        args.presets = benchlib.parse_list(args.presets, list(PRESETS), "presets")
        args.impls = benchlib.parse_list(args.impls, IMPLS, "impls")
        args.precisions = benchlib.parse_list(args.precisions, PRECISIONS, "precisions")
        args.tokens = benchlib.parse_tokens(args.tokens) if args.tokens is not None else None
        args.skip = parse_skip(args.skip)
    except ValueError as e:
        p.error(str(e))
    benchlib.check_torch_run_args(p, args)
    if args.group_align < 1 or args.group_align > 128:
        p.error(f"--group-align must be in 1...128, got {args.group_align}")
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
    cases `--skip` left out). grouped runs bf16 only. A precision that is not timed is still checked when `--check`
    needs its weights (bf16 for grouped), but one whose every implementation `--skip` left out is not built at all:
    that is what skipping it is for (DeepSeek-V3 in TF32 needs 45 GB of weights)."""
    timed = precision in args.precisions
    candidates = [i for i in args.impls if timed and not (i == "grouped" and precision != "bf16")]
    impls = [i for i in candidates if not is_skipped(args.skip, preset, i, precision)]
    left_out = [f"{preset}:{i}:{precision} (--skip)" for i in candidates if i not in impls]
    # Checking a precision needs the loop (the reference of grouped) or grouped itself (bf16).
    checking = args.check and ("loop" in args.impls or precision == "bf16") and not (candidates and not impls)
    return impls, checking, left_out


# ---------------------------------------------------------------------------------------------------------------
# Torch parts. `torch` and `F` are module globals bound by load_torch(), so nothing above needs torch.

torch = None  # type: ignore[assignment]
F = None  # type: ignore[assignment]
GROUPED_MM = None


def bind_torch():
    """Imports torch and binds this module's globals `torch`, `F` and `GROUPED_MM` (None when the build has no
    grouped matmul); needs no GPU, so torch_ep_baseline.py's CPU mode and the unit tests can use the layer code."""
    global torch, F, GROUPED_MM
    try:
        import torch as _torch
        import torch.nn.functional as _F
    except ImportError as e:
        raise BenchError(f"cannot import torch ({e}); run this on the GPU host with PyTorch installed") from None
    torch, F = _torch, _F
    GROUPED_MM = getattr(torch, "_grouped_mm", None) or getattr(F, "grouped_mm", None)
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
    return {"tf32": torch.float32, "bf16": torch.bfloat16}[precision]


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


def weight_bytes_estimate(spec: PresetSpec, precision: str) -> int:
    eb = benchlib.ELEMENT_BYTES[precision]
    H, I, E = spec.hidden, spec.inter, spec.experts
    return eb * (E * H + E * spec.ffn_mats * H * I + 3 * H * spec.shared_inter)


def workspace_estimate(spec: PresetSpec, precision: str, tokens: int, input_sets: int, align: int) -> int:
    """Generous upper bound of the activations of one call (grouped's buffers, fp32 accumulators) + the inputs."""
    eb = benchlib.ELEMENT_BYTES[precision]
    n = tokens * spec.top_k + spec.experts * align
    H, I = spec.hidden, max(spec.inter, spec.shared_inter)
    per_call = n * (3 * H + 3 * I) * eb + tokens * H * 8 + tokens * 3 * I * eb + tokens * spec.experts * 16
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


def forward_loop(layer: Layer, x):
    """Per-expert loop: one sort, one host sync for the counts, then index_select / FFN / weighted index_add_."""
    spec = layer.spec
    S = x.shape[0]
    ids, w = route(layer, x)
    flat, order, tok = sort_by_expert(ids)
    w_sorted = w.reshape(-1)[order]
    counts = torch.bincount(flat, minlength=spec.experts).tolist()  # the loop's one host sync
    out = torch.zeros(S, spec.hidden, dtype=torch.float32, device=x.device)
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        idx = tok[start:start + c]
        ye = expert_ffn(layer, e, x.index_select(0, idx))
        out.index_add_(0, idx, ye.float() * w_sorted[start:start + c].unsqueeze(1))
        start += c
    if layer.ws_in is not None:
        out += shared_ffn(layer, x).float()
    return out.to(x.dtype)


def forward_grouped(layer: Layer, x, align: int = 1):
    """Sort by expert, grouped GEMMs with int32 cumulative offsets (no host sync), unpermute, weighted sum."""
    E = layer.spec.experts
    ids, w = route(layer, x)
    flat, order, tok = sort_by_expert(ids)
    n = flat.numel()
    counts = torch.zeros(E, dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, flat, torch.ones(n, dtype=torch.int32, device=x.device))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    xs = x.index_select(0, tok)
    dest = None
    if align > 1:
        # Each expert's rows start at a multiple of `align`; an empty expert still gets one block (as torchtitan
        # does), so no group is empty. The buffer size is a static bound: no host sync.
        padded = torch.clamp_min((counts + (align - 1)) // align * align, align)
        offs_p = torch.cumsum(padded, 0, dtype=torch.int32)
        e_sorted = flat[order]
        rank = torch.arange(n, device=x.device) - (offs - counts).long()[e_sorted]
        dest = (offs_p - padded).long()[e_sorted] + rank
        buf = x.new_zeros(n + E * align, x.shape[1])
        buf.index_copy_(0, dest, xs)
        xs, offs = buf, offs_p
    y = grouped_experts(layer, xs, offs)
    if dest is not None:
        y = y.index_select(0, dest)
    out = combine_slots(y, order, w)
    if layer.ws_in is not None:
        out = out + shared_ffn(layer, x)
    return out


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


def run(args: argparse.Namespace) -> int:
    device = load_torch(args.device)
    props = torch.cuda.get_device_properties(device)
    log(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {props.name} (sm_{props.major}{props.minor}, "
        f"{props.total_memory / 2**30:.0f} GiB)")
    if "grouped" in args.impls:
        if GROUPED_MM is None:
            raise BenchError(f"torch {torch.__version__} has neither torch._grouped_mm nor F.grouped_mm: "
                             f"use --impls loop or torch >= 2.8")
        if props.major < 9:
            log("warning: _grouped_mm's CUTLASS path needs sm_90+; on this GPU it loops over groups internally")
    if args.repeats < 20:
        log(f"warning: --repeats {args.repeats} < 20; the brief's method asks for at least 20")
    if args.input_sets < 2:
        log("warning: --input-sets 1 may measure a warm L2 rather than the layer")

    t0 = time.time()
    rates = measure_rates(device)
    log(f"rates: bf16 {rates['bf16_tflops']:.0f} TFLOP/s, tf32 {rates['tf32_tflops']:.0f} TFLOP/s, "
        f"fp32 {rates['fp32_tflops']:.0f} TFLOP/s, copy {rates['copy_gbps']:.0f} GB/s  ({time.time() - t0:.1f} s)")

    results: list[dict] = []
    failures: list[str] = []
    skipped: list[str] = []
    with torch.inference_mode():
        for name in args.presets:
            spec = PRESETS[name]
            token_list = args.tokens or list(spec.tokens)
            # The check needs bf16 weights when grouped is checked; build them even if bf16 is not timed.
            precisions = list(args.precisions)
            if args.check and "grouped" in args.impls and "bf16" not in precisions:
                precisions.append("bf16")
            for prec in precisions:
                impls, checking, left_out = plan_case(args, name, prec)
                skipped += left_out
                if not impls and not checking:
                    continue
                need = weight_bytes_estimate(spec, prec) + max(
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
                    try:
                        bad = run_checks(layer, prec, args.check_tokens, args.seed, args.impls, args.group_align)
                    except RuntimeError as e:
                        bad = [f"the check raised {type(e).__name__}: {first_line(e)}"]
                    failures += [f"{name} {prec}: {b}" for b in bad]
                    for b in bad:
                        log(f"  CHECK FAILED: {b}")
                    if bad:
                        # Numbers from a layer that computes the wrong thing would only mislead.
                        skipped += [f"{name}:{i}:{prec} (check failed)" for i in impls]
                        impls = []
                for S in token_list if impls else []:
                    g = torch.Generator(device=device)
                    g.manual_seed(args.seed + S)
                    inputs = [torch.randn(S, spec.hidden, dtype=layer.dtype, device=device, generator=g)
                              for _ in range(args.input_sets)]
                    touched = experts_touched(layer, inputs)
                    flops = benchlib.layer_flops(spec, S)
                    nbytes = benchlib.layer_bytes(spec, S, touched, benchlib.ELEMENT_BYTES[prec])
                    floor = benchlib.floor_ms(flops, nbytes, rates[f"{prec}_tflops"], rates["copy_gbps"])
                    for impl in impls:
                        fn = ((lambda x: forward_loop(layer, x)) if impl == "loop"
                              else (lambda x: forward_grouped(layer, x, args.group_align)))
                        try:
                            times = time_calls(fn, inputs, args.warmup, args.repeats)
                        except RuntimeError as e:
                            error = f"{name} S={S} {impl} {prec}: {type(e).__name__}: {first_line(e)}"
                        if error:
                            failures.append(error)
                            log(f"ERROR {error}")
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
                        results.append(r)
                        save_json(args.json, results)  # after every case, so a crash keeps what was measured
                        log(f"  {name:<14} S={S:<5} {impl:<7} {prec}: median {med:8.3f} ms  min {mn:8.3f} ms  "
                            f"{r['tflops']:6.1f} TFLOP/s  floor {floor:.3f} ms  ({med / floor:.1f}x floor, "
                            f"{touched:.0f} experts touched)")
                    del inputs
                del layer
                free_memory()

    rows = [[r["preset"], str(r["tokens"]), r["impl"], r["precision"], benchlib.fmt_ms(r["median_ms"]),
             benchlib.fmt_ms(r["min_ms"]), f"{r['tflops']:.1f}", benchlib.fmt_ms(r["floor_ms"]),
             f"{r['median_ms'] / r['floor_ms']:.1f}x"] for r in results]
    log("")
    log(benchlib.text_table(
        ["preset", "tokens", "impl", "prec", "median ms", "min ms", "TFLOP/s", "floor ms", "vs floor"], rows))
    log(f"rates: bf16 {rates['bf16_tflops']:.0f} TFLOP/s, tf32 {rates['tf32_tflops']:.0f} TFLOP/s, copy "
        f"{rates['copy_gbps']:.0f} GB/s; median of {args.repeats} after {args.warmup} warm-up, "
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
