#!/usr/bin/env python3
"""The summary of one scripts/gpu-python run, as markdown tables (for Benchmarks/RESULTS.md), from the run's
gpu_checks.json and torch_op_bench.json. Plain Python.

    python3 python/tests/gpu_summary.py OUTPUT_DIR
"""

from __future__ import annotations

import json
import os
import sys

OVERHEAD_TARGET_US = 10.0


def load(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        print(f"({os.path.basename(path)}: {e})")
        return None


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def key_number(check: dict) -> str:
    d = check.get("detail") or {}
    if "error" in d:
        return d["error"][:120]
    name = check["check"]
    if name == "families-fp32":
        return ", ".join(f"{f} {v['logits_rel_error']:.1e} gen {'=' if v['generate_identical'] else '≠'}"
                         if "error" not in v else f"{f} {v['error'][:80]}" for f, v in d.items())
    if name == "families-bf16":
        return ", ".join(f"{f} {v['patched_vs_original']:.1e}" if "error" not in v else f"{f} {v['error'][:80]}"
                         for f, v in d.items())
    if name in ("graph-replays", "two-streams"):
        return f"{d.get('mismatches')} mismatches"
    if name == "kernel-fault":
        return f"raised in {d.get('check', {}).get('seconds', '?')} s"
    if name == "bad-inputs":
        return f"{sum(1 for k in d if k != 'note')} refusals"
    return json.dumps(d, default=str)[:120]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    out = argv[0]
    checks = load(os.path.join(out, "gpu_checks.json")) or []
    bench = load(os.path.join(out, "torch_op_bench.json")) or {}

    print("\n## GPU checks (python/tests/gpu_checks.py)\n")
    print(table(["check", "status", "s", "result"],
                [[c["check"], c["status"], c["seconds"], key_number(c)] for c in checks]))

    overhead = bench.get("overhead")
    if isinstance(overhead, list):
        print("\n## Overhead over the bare kernel (GPU idle before each call, CUDA events around it)\n")
        rows = []
        for r in overhead:
            rows.append([r["shape"], r["tokens"], f"{r['bare_idle_ms'] * 1e3:.1f}", f"{r['op_idle_ms'] * 1e3:.1f}",
                         f"{r['op_overhead_us']:.1f}", f"{r.get('op_y_overhead_us', float('nan')):.1f}",
                         f"{r.get('op_out_overhead_us', float('nan')):.1f}",
                         f"{r['module_overhead_us']:.1f}", f"{r['bare_host_us']:.1f}", f"{r['op_host_us']:.1f}",
                         "yes" if r["op_overhead_us"] <= OVERHEAD_TARGET_US else "NO"])
        print(table(["shape", "S", "bare µs", "op µs", "op − bare µs", "op_y − bare µs", "op_out − bare µs",
                     "module − bare µs", "bare host µs/call", "op host µs/call", f"op ≤ {OVERHEAD_TARGET_US:g} µs"],
                    rows))
    elif overhead:
        print(f"\noverhead: {overhead}")

    breakdown = bench.get("breakdown")
    if isinstance(breakdown, list):
        print("\n## Host time before the launch (GPU idle before each call), allocations, the op with the C call "
              "stubbed (µs)\n")
        paths = ("bare", "op", "op_y", "op_out", "module")
        print(table(["shape", "S"] + [f"{p} pre-launch" for p in paths] + ["alloc y", "alloc 3 outputs", "op stub",
                                                                          "op_y stub", "op − bare alternating"],
                    [[r["shape"], r["tokens"]] + [f"{r[f'{p}_prelaunch_us']:.1f}" for p in paths] +
                     [f"{r[k]:.1f}" for k in ("alloc_y_us", "alloc_outputs_us", "op_stub_host_us",
                                              "op_y_stub_host_us")] +
                     [f"{r.get('op_interleaved_overhead_us', float('nan')):.1f}"] for r in breakdown]))
    elif breakdown:
        print(f"\nbreakdown: {breakdown}")

    decode = bench.get("decode")
    if isinstance(decode, dict) and "op_idle_ms" in decode:
        print("\n## Decode step qwen3-30b-a3b S = 64 bf16\n")
        fm = decode.get("flashmoe_bench_ms")
        print(table(["op ms", "op ms back-to-back", "bare ms", "flashmoe bench ms", "op / reference", "within 5 %"],
                    [[f"{decode['op_idle_ms']:.3f}", f"{decode['op_loop_ms']:.3f}", f"{decode['bare_idle_ms']:.3f}",
                      f"{fm:.3f}" if fm else "–", f"{decode['op_vs_reference']:.3f} ({decode['reference']})",
                      "yes" if decode["within_5_percent"] else "NO"]]))
    elif decode:
        print(f"\ndecode: {decode}")

    model = bench.get("model")
    if isinstance(model, dict) and "cases" in model:
        print(f"\n## Qwen3-30B-A3B layer shapes, 2 layers, bf16 (vocab {model.get('vocab')}): ms, GPU idle before "
              f"each call\n")
        rows = []
        for case, row in model["cases"].items():
            for what in ("block", "model"):
                if f"{what}_fastest_builtin" not in row:
                    continue
                fastest = row[f"{what}_fastest_builtin"]
                rows.append([case, what, f"{row['transformers eager'][f'{what}_ms']:.3f}",
                             f"{row[fastest][f'{what}_ms']:.3f} ({fastest.removeprefix('transformers ')})",
                             f"{row['flashmoe'][f'{what}_ms']:.3f}", f"{row[f'{what}_speedup_vs_eager']:.2f}×",
                             f"{row[f'{what}_speedup_vs_fastest']:.2f}×"])
        print(table(["case", "what", "transformers eager", "fastest built-in", "flashmoe", "vs eager", "vs fastest"],
                    rows))
        if "patched_vs_eager_rel_error" in model:
            print(f"\npatched vs eager logits (256 tokens): relative error {model['patched_vs_eager_rel_error']:.2e}")
    elif model:
        print(f"\nmodel: {model}")
    failed = [c["check"] for c in checks if c["status"] != "PASS"]
    print(f"\nchecks: {len(checks) - len(failed)} passed, {len(failed)} failed {failed if failed else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
