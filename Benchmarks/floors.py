#!/usr/bin/env python3
"""The roofline floors of docs/performance.md: what no implementation of a MoE layer call can beat on the H200.

  python3 Benchmarks/floors.py                 # issue 11's cases, as the markdown table of docs/performance.md
  python3 Benchmarks/floors.py --cases sweep   # every preset at the sweep's token counts (scripts/gpu-sweep)

floor = max(FLOPs / matmul rate, bytes / copy bandwidth), with the H200 reference rates (REFERENCE_TFLOPS,
REFERENCE_COPY_GBPS) and the bytes `flashmoe bench` counts (Sources/FlashMoECLI/Roofline.swift, mirrored by
`flashmoe_bytes`): the weights of the experts the call touches, the router (and DeepSeek's fp32 selection bias),
the shared expert, the input in the storage type and the FP32 output. `flashmoe bench` counts the experts its own
routing touched; without a run, `benchlib.expected_experts_touched` estimates them as E·(1 − (1 − k/E)^S), the
expectation when each token picks k distinct experts uniformly (random weights route close to uniformly).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

#: Dense matmul rates of one H200 in TFLOP/s (torch 2.11, best of 10 8192³ products; fp16 taken as bf16), the
#: reference of docs/performance.md and Roofline.swift.
REFERENCE_TFLOPS = {"bf16": 773.0, "fp16": 773.0, "tf32": 415.0, "fp32": 50.0}
#: Device-to-device copy bandwidth of one H200 in GB/s (read + write bytes of a 2 GiB copy).
REFERENCE_COPY_GBPS = 4200.0

#: Issue 11's table: (preset, tokens, precision).
ISSUE_CASES = [
    ("paper-e64", 8192, "bf16"), ("paper-e64", 8192, "tf32"), ("paper-e32", 8192, "bf16"),
    ("qwen3-30b-a3b", 4096, "bf16"), ("qwen3-30b-a3b", 16384, "bf16"), ("qwen3-30b-a3b", 64, "bf16"),
    ("qwen3-30b-a3b", 1, "bf16"), ("paper-e64", 128, "bf16"), ("mixtral-8x7b", 4096, "bf16"),
    ("deepseek-v3", 4096, "bf16"), ("deepseek-v3", 64, "bf16"),
]

#: The token counts of scripts/gpu-sweep and Benchmarks/plots.py.
SWEEP_TOKENS = (1, 16, 64, 256, 1024, 4096, 16384)


def flashmoe_bytes(spec: benchlib.PresetSpec, tokens: int, touched: float, precision: str) -> float:
    """Bytes one call must move at least once, as Roofline.swift counts them."""
    storage = benchlib.ELEMENT_BYTES[precision]
    weights = touched * spec.ffn_mats * spec.hidden * spec.inter * storage
    router = spec.experts * spec.hidden * storage + (spec.experts * 4 if spec.router == "deepseek" else 0)
    shared = spec.ffn_mats * spec.hidden * spec.shared_inter * storage
    activations = tokens * spec.hidden * (storage + 4)  # the input, and the FP32 output
    return weights + router + shared + activations


def reference_floor(preset: str, tokens: int, precision: str, touched: float | None = None) -> dict:
    """The floor of one case on the reference H200: FLOPs, bytes, both times, the floor and what bounds it."""
    if preset not in benchlib.PRESETS:
        raise ValueError(f"unknown preset {preset}: choose from {', '.join(benchlib.PRESETS)}")
    if precision not in REFERENCE_TFLOPS:
        raise ValueError(f"unknown precision {precision}: choose from {', '.join(REFERENCE_TFLOPS)}")
    if tokens < 1:
        raise ValueError(f"tokens must be positive, got {tokens}")
    spec = benchlib.PRESETS[preset]
    if touched is None:
        touched = benchlib.expected_experts_touched(spec, tokens)
    flops = benchlib.layer_flops(spec, tokens)
    nbytes = flashmoe_bytes(spec, tokens, touched, precision)
    compute_ms = flops / (REFERENCE_TFLOPS[precision] * 1e12) * 1e3
    memory_ms = nbytes / (REFERENCE_COPY_GBPS * 1e9) * 1e3
    return {
        "preset": preset, "tokens": tokens, "precision": precision, "touched": touched, "flops": flops,
        "bytes": nbytes, "compute_ms": compute_ms, "memory_ms": memory_ms, "floor_ms": max(compute_ms, memory_ms),
        "bound": "compute" if compute_ms >= memory_ms else "memory",
    }


def cases(kind: str) -> list[tuple[str, int, str]]:
    """Issue 11's cases, or every preset in bf16 at the sweep's token counts."""
    if kind == "issue":
        return list(ISSUE_CASES)
    if kind == "sweep":
        return [(p, s, "bf16") for p in benchlib.PRESETS for s in SWEEP_TOKENS]
    raise ValueError(f"unknown case list {kind}: issue or sweep")


def markdown(rows: list[dict]) -> str:
    """The floors as docs/performance.md shows them."""
    out = []
    for r in rows:
        out.append([r["preset"], str(r["tokens"]), r["precision"], f"{r['touched']:.1f}", f"{r['flops'] / 1e12:.3f}",
                    f"{r['bytes'] / 1e9:.3f}", f"{r['compute_ms']:.3f}", f"{r['memory_ms']:.3f}",
                    f"**{r['floor_ms']:.3f}**", r["bound"]])
    headers = ["preset", "S", "precision", "experts touched", "TFLOP", "GB", "compute ms", "memory ms", "floor ms",
               "bound"]
    return benchlib.markdown_table(headers, out, align_right={1, 3, 4, 5, 6, 7, 8})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Roofline floors of FlashMoE's presets on the reference H200.")
    p.add_argument("--cases", default="issue", choices=["issue", "sweep"], help="which cases to list")
    args = p.parse_args(argv)
    print(markdown([reference_floor(*c) for c in cases(args.cases)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
