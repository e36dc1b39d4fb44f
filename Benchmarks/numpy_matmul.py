#!/usr/bin/env python3
"""numpy float32 matmul GFLOP/s on this CPU, for the GEMM shapes FlashMoE's CPU backend runs.

Cases (C = A·B, A is M×K, B is K×N, float32, contiguous):
- `square`:   M = K = N = 2048 — what the BLAS reaches on a large GEMM;
- `expert16`: M=16, K=N=2048, batched over 32 experts (np.matmul on [32,16,2048]·[32,2048,2048]) — one expert's
  GEMM at paper-e32 with 256 tokens (256·k/E = 16 rows per expert), the shape the CPU backend meets there;
- `expert256`: M=256, K=N=2048 — a fuller expert;
- `layer`:    the whole paper-e32 layer at 256 tokens in numpy (gate GEMM, softmax, top-2 renormalised, per-expert
  loop with ReLU FFN, weighted combine), counted with the same FLOP formula as the other benchmarks
  (2·S·k·H·I·2 + 2·S·H·E), so its ms compare directly with `flashmoe bench --backend cpu`.

Median (and min) of `--repeats` runs after `--warmup`. The thread count is numpy's BLAS default (set
OPENBLAS_NUM_THREADS / OMP_NUM_THREADS to change it). `--json FILE` writes a list of result dicts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

CASES = ("square", "expert16", "expert256", "layer")


def time_ms(fn, warmup: int, repeats: int) -> list[float]:
    """Wall-clock milliseconds of each of `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def random_f32(rng: np.random.Generator, shape: tuple[int, ...], bound: float | None = None) -> np.ndarray:
    """Uniform ±bound (weights) or standard normal (activations, bound None), float32."""
    if bound is None:
        return rng.standard_normal(shape, dtype=np.float32)
    return rng.uniform(-bound, bound, size=shape).astype(np.float32)


def moe_layer_numpy(x, wg, w1, w2, k: int) -> np.ndarray:
    """paper-style MoE layer: softmax top-k renormalised, y = Σ_j w_j · relu(x·W1ᵀ)·W2ᵀ (W1 [E,I,H], W2 [E,H,I])."""
    logits = x @ wg.T
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    ids = np.argsort(-p, axis=1, kind="stable")[:, :k]
    w = np.take_along_axis(p, ids, axis=1)
    w /= w.sum(axis=1, keepdims=True)
    out = np.zeros_like(x)
    flat = ids.reshape(-1)
    order = np.argsort(flat, kind="stable")
    counts = np.bincount(flat, minlength=w1.shape[0])
    tok = order // k
    ws = w.reshape(-1)[order]
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        t = tok[start:start + c]
        h = np.maximum(x[t] @ w1[e].T, 0)
        # A token's k experts are distinct, so `t` has no repeats and fancy-index += is exact here.
        out[t] += (h @ w2[e].T) * ws[start:start + c, None]
        start += c
    return out


def run_case(name: str, rng: np.random.Generator, warmup: int, repeats: int) -> dict:
    if name == "layer":
        spec = benchlib.PRESETS["paper-e32"]
        S, H, I, E = 256, spec.hidden, spec.inter, spec.experts
        xs = [random_f32(rng, (S, H)) for _ in range(2)]
        wg = random_f32(rng, (E, H), H ** -0.5)
        w1 = random_f32(rng, (E, I, H), H ** -0.5)
        w2 = random_f32(rng, (E, H, I), I ** -0.5)
        i = iter(range(1 << 62))
        times = time_ms(lambda: moe_layer_numpy(xs[next(i) % 2], wg, w1, w2, spec.top_k), warmup, repeats)
        flops = benchlib.layer_flops(spec, S)
        shape = {"preset": "paper-e32", "tokens": S}
    else:
        m, batch = {"square": (2048, 1), "expert16": (16, 32), "expert256": (256, 1)}[name]
        K = N = 2048
        lead = (batch,) if batch > 1 else ()
        a = random_f32(rng, lead + (m, K))
        b = random_f32(rng, lead + (K, N), K ** -0.5)
        times = time_ms(lambda: np.matmul(a, b), warmup, repeats)
        flops = 2 * batch * m * K * N
        shape = {"m": m, "k": K, "n": N, "batch": batch}
    med = statistics.median(times)
    return {"case": name, **shape, "median_ms": med, "min_ms": min(times), "gflops": flops / (med * 1e-3) / 1e9,
            "flops": flops, "repeats": repeats, "backend": "numpy", "numpy": np.__version__}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="numpy float32 matmul GFLOP/s for FlashMoE's CPU GEMM shapes.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help="comma list of cases")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per case")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per case")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", default=None, metavar="FILE", help="write the results as a JSON list to FILE")
    args = p.parse_args(argv)
    try:
        args.cases = benchlib.parse_list(args.cases, CASES, "cases")
    except ValueError as e:
        p.error(str(e))
    benchlib.check_timing_args(p, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    threads = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or "default"
    print(f"numpy {np.__version__}, {os.cpu_count()} CPUs, BLAS threads: {threads}", flush=True)
    results = []
    for name in args.cases:
        r = run_case(name, rng, args.warmup, args.repeats)
        results.append(r)
        print(f"  {name:<9} median {r['median_ms']:9.3f} ms  min {r['min_ms']:9.3f} ms  {r['gflops']:7.1f} GFLOP/s",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {len(results)} results to {args.json}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
