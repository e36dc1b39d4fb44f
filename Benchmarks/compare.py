#!/usr/bin/env python3
"""Side-by-side tables of FlashMoE's benchmark JSON against the baselines, as markdown for Benchmarks/RESULTS.md.

  python3 Benchmarks/compare.py --torch torch.json flashmoe-a.json [flashmoe-b.json ...]
  python3 Benchmarks/compare.py --numpy numpy.json flashmoe-cpu.json

FlashMoE files (from `flashmoe bench --json`) hold a JSON list of dicts (a single dict is accepted too) with at
least preset, tokens, precision, median_ms, and optionally tflops or gflops, floor_ms, backend. The torch file
comes from torch_moe_baseline.py, the numpy file from numpy_matmul.py.

With --torch: one row per (preset, tokens, precision) with the FlashMoE ms, torch loop ms, torch grouped ms,
the speed-up of FlashMoE over the faster torch implementation at the same precision, and the floor (FlashMoE's
floor_ms when given, else the torch script's). With --numpy: FlashMoE's CPU layer against numpy running the same
layer (paper-e32, 256 tokens) and against numpy's GEMM rate at the expert shape; `--cpu-target` (default 0.40) is
the fraction of numpy's layer speed FlashMoE's CPU backend should reach.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

PRECISION_ORDER = ["fp32", "tf32", "bf16", "fp16"]


class InputError(Exception):
    """A file that is missing, not JSON, or lacks the keys a table needs."""


def load_entries(path: str) -> list[dict]:
    """A JSON list of dicts (or one dict) from `path`."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not JSON: {e}") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        raise InputError(f"{path} must hold a JSON list of objects")
    return data


def require(entry: dict, keys: list[str], path: str) -> None:
    missing = [k for k in keys if k not in entry]
    if missing:
        raise InputError(f"{path}: an entry lacks {', '.join(missing)} (has {', '.join(sorted(entry))})")


def key_of(entry: dict) -> tuple[str, int, str]:
    return str(entry["preset"]), int(entry["tokens"]), str(entry["precision"]).lower()


def sort_key(key: tuple[str, int, str]) -> tuple:
    preset, tokens, prec = key
    names = list(benchlib.PRESETS)
    return (names.index(preset) if preset in names else len(names), preset, -tokens,
            PRECISION_ORDER.index(prec) if prec in PRECISION_ORDER else len(PRECISION_ORDER), prec)


def index_flashmoe(paths: list[str], warn) -> dict[tuple[str, int, str], dict]:
    """FlashMoE entries by (preset, tokens, precision); a later entry replaces an earlier one, with a warning.
    Expert-parallel entries (a `ranks` field, from `bench --ranks`) are left to scaling.py."""
    out: dict[tuple[str, int, str], dict] = {}
    for path in paths:
        for e in load_entries(path):
            if e.get("ranks"):
                continue
            require(e, ["preset", "tokens", "precision", "median_ms"], path)
            k = key_of(e)
            if k in out:
                warn(f"warning: {path} repeats {k[0]} S={k[1]} {k[2]}; using the later entry")
            out[k] = e
    return out


def torch_table(torch_path: str, flashmoe: dict[tuple[str, int, str], dict]) -> str:
    """The GPU comparison table (markdown)."""
    loops: dict[tuple, dict] = {}
    grouped: dict[tuple, dict] = {}
    for e in load_entries(torch_path):
        require(e, ["preset", "tokens", "precision", "impl", "median_ms"], torch_path)
        {"loop": loops, "grouped": grouped}.get(e["impl"], {})[key_of(e)] = e
    keys = sorted(set(flashmoe) | set(loops) | set(grouped), key=sort_key)
    rows = []
    for k in keys:
        f, lo, gr = flashmoe.get(k), loops.get(k), grouped.get(k)
        torch_ms = [e["median_ms"] for e in (lo, gr) if e is not None]
        speedup = f"{min(torch_ms) / f['median_ms']:.2f}×" if f is not None and torch_ms else "–"
        floor = next((e["floor_ms"] for e in (f, lo, gr) if e is not None and e.get("floor_ms") is not None), None)
        rows.append([k[0], str(k[1]), k[2], benchlib.fmt_ms(f["median_ms"] if f else None),
                     benchlib.fmt_ms(lo["median_ms"] if lo else None), benchlib.fmt_ms(gr["median_ms"] if gr else None),
                     speedup, benchlib.fmt_ms(floor)])
    headers = ["preset", "tokens", "precision", "FlashMoE ms", "torch loop ms", "torch grouped ms",
               "speed-up vs best torch", "floor ms"]
    return benchlib.markdown_table(headers, rows, align_right={1, 3, 4, 5, 6, 7})


def tflops_of(entry: dict) -> float | None:
    """TFLOP/s from `tflops` or `gflops`, or None."""
    if entry.get("tflops") is not None:
        return float(entry["tflops"])
    if entry.get("gflops") is not None:
        return float(entry["gflops"]) / 1e3
    return None


def numpy_table(numpy_path: str, flashmoe: dict[tuple[str, int, str], dict], target: float) -> tuple[str, list[str]]:
    """The CPU comparison table (markdown) and one verdict line per FlashMoE entry of numpy's layer shape."""
    cases = {}
    for e in load_entries(numpy_path):
        require(e, ["case", "median_ms", "gflops"], numpy_path)
        cases[e["case"]] = e
    layer = cases.get("layer")
    if layer is None:
        raise InputError(f"{numpy_path} has no 'layer' case; run numpy_matmul.py with the default --cases")
    gemm = cases.get("expert16")
    matches = [(k, e) for k, e in flashmoe.items() if (k[0], k[1]) == (layer["preset"], layer["tokens"])]
    if not matches:
        raise InputError(f"no FlashMoE entry for {layer['preset']} with {layer['tokens']} tokens")
    rows, verdicts = [], []
    for k, e in sorted(matches, key=lambda m: sort_key(m[0])):
        ratio = layer["median_ms"] / e["median_ms"]
        tf = tflops_of(e)
        if tf is not None:
            gflops = tf * 1e3
        elif k[0] in benchlib.PRESETS:  # the entry gives no rate: count the layer's FLOPs ourselves
            gflops = benchlib.layer_flops(benchlib.PRESETS[k[0]], k[1]) / (e["median_ms"] * 1e-3) / 1e9
        else:
            gflops = None
        vs_gemm = f"{gflops / gemm['gflops']:.0%}" if gflops is not None and gemm else "–"
        rows.append([k[0], str(k[1]), k[2], benchlib.fmt_ms(e["median_ms"]), benchlib.fmt_ms(layer["median_ms"]),
                     f"{gflops:.1f}" if gflops is not None else "–",
                     f"{gemm['gflops']:.1f}" if gemm else "–", f"{ratio:.0%}", vs_gemm])
        verdicts.append(f"{k[0]} S={k[1]} {k[2]}: FlashMoE CPU runs at {ratio:.0%} of numpy's speed on the same "
                        f"layer (target ≥ {target:.0%}): {'OK' if ratio >= target else 'BELOW TARGET'}")
    headers = ["preset", "tokens", "precision", "FlashMoE ms", "numpy layer ms", "FlashMoE GFLOP/s",
               "numpy GEMM GFLOP/s (16×2048×2048 ×32)", "numpy ms / FlashMoE ms", "FlashMoE / numpy GEMM"]
    return benchlib.markdown_table(headers, rows, align_right=set(range(1, 9)) - {2}), verdicts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Markdown tables of FlashMoE benchmark JSON against torch / numpy.")
    p.add_argument("flashmoe", nargs="+", help="FlashMoE bench JSON file(s)")
    p.add_argument("--torch", default=None, help="JSON from torch_moe_baseline.py")
    p.add_argument("--numpy", default=None, help="JSON from numpy_matmul.py")
    p.add_argument("--cpu-target", type=float, default=0.40, help="fraction of numpy's layer speed to reach")
    p.add_argument("--strict", action="store_true", help="exit 3 when a CPU entry is below --cpu-target")
    args = p.parse_args(argv)
    if args.torch is None and args.numpy is None:
        p.error("give --torch FILE, --numpy FILE, or both")
    if not 0 < args.cpu_target <= 10:
        p.error(f"--cpu-target is a fraction such as 0.4, got {args.cpu_target}")

    def warn(msg: str) -> None:
        print(msg, file=sys.stderr)

    try:
        flashmoe = index_flashmoe(args.flashmoe, warn)
        below = False
        if args.torch:
            print(torch_table(args.torch, flashmoe))
        if args.numpy:
            if args.torch:
                print()
            table, verdicts = numpy_table(args.numpy, flashmoe, args.cpu_target)
            print(table)
            print()
            for v in verdicts:
                print(v)
            below = any(v.endswith("BELOW TARGET") for v in verdicts)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 3 if below and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
