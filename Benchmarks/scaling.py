#!/usr/bin/env python3
"""Multi-GPU scaling tables of FlashMoE's expert-parallel layer against the PyTorch expert-parallel baseline, as
markdown for Benchmarks/RESULTS.md.

  python3 Benchmarks/scaling.py flashmoe.json torch-ep.json [more.json ...] [--tokens-per-gpu 8192] [--gpus 8]

Every file holds a JSON list of objects (or one object); each object is classified by its fields:
- torch-ep (`impl` = "torch-ep", from torch_ep_baseline.py): preset, experts, tokens_per_gpu, gpus, precision,
  median_ms.
- FlashMoE (`flashmoe bench --json`: a `backend`, no `impl`): preset, tokens, precision, median_ms, and for an
  expert-parallel run `ranks` (R) and `rank_devices` (the GPU of each kernel launch). R ranks on R distinct GPUs
  are an R-GPU point with tokens / R per GPU; a record without `ranks` (or with R = 1) is a 1-GPU point. R ranks
  sharing fewer GPUs are left out (they are not a multi-GPU measurement). The expert count is the record's
  `experts`, else the `E=` of its config (a preset with overrides is named "custom (from NAME)"), else the preset's.
  CPU and oracle records are left out. (`bench --ranks R --json` writes two records: the single-GPU operator on
  all R·T tokens, a 1-GPU point at R·T, then the ranks' record, the R-GPU point at T.)
Other records (torch_moe_baseline's loop and grouped) are left out, with a note on standard error.

Tables (a missing point shows as –):
- weak scaling at T tokens per GPU (`--tokens-per-gpu`) and each preset's own expert count, for GPUs 1, 2, 4, 8
  (and any other count present): FlashMoE and torch-ep ms, their efficiencies t(1 GPU, T) / t(N GPUs, N·T), and
  the speed-up torch-ep / FlashMoE;
- token scaling at `--gpus` GPUs, when it has a point at another T than the weak-scaling one;
- expert scaling at `--gpus` GPUs and T, when it has a point at another expert count than the preset's own.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from compare import PRECISION_ORDER, InputError, load_entries, require  # noqa: E402

GPU_COUNTS = (1, 2, 4, 8)
FLASHMOE_HOST_BACKENDS = ("cpu", "oracle")
CUSTOM_PRESET = re.compile(r"^custom \(from (?P<base>[^)]+)\)$")
EXPERTS_IN_CONFIG = re.compile(r"\bE=(\d+)\b")


@dataclass(frozen=True)
class Key:
    """One measured point: a layer shape at a precision on some GPUs with T tokens on each."""

    preset: str
    experts: int
    precision: str
    gpus: int
    tokens_per_gpu: int


# ---------------------------------------------------------------------------------------------------------------
# Reading the records.


def default_experts(preset: str) -> int | None:
    spec = benchlib.PRESETS.get(preset)
    return spec.experts if spec else None


def positive_int(entry: dict, field: str, path: str) -> int:
    v = entry[field]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise InputError(f"{path}: {field} must be a positive integer, got {v!r}")
    return v


def torch_ep_key(entry: dict, path: str) -> Key:
    require(entry, ["preset", "experts", "tokens_per_gpu", "gpus", "precision", "median_ms"], path)
    return Key(str(entry["preset"]), positive_int(entry, "experts", path), str(entry["precision"]).lower(),
               positive_int(entry, "gpus", path), positive_int(entry, "tokens_per_gpu", path))


def flashmoe_key(entry: dict, path: str) -> tuple[Key | None, str | None]:
    """The point of a FlashMoE record, or None and why it is left out."""
    require(entry, ["preset", "tokens", "precision", "median_ms"], path)
    preset = str(entry["preset"])
    m = CUSTOM_PRESET.match(preset)
    preset = m.group("base") if m else preset
    if entry.get("experts") is not None:
        experts = positive_int(entry, "experts", path)
    else:
        found = EXPERTS_IN_CONFIG.search(str(entry.get("config", "")))
        experts = int(found.group(1)) if found else default_experts(preset)
    if experts is None:
        return None, f"{path}: {preset} gives no expert count (no experts field, no E= in its config)"
    tokens = positive_int(entry, "tokens", path)
    precision = str(entry["precision"]).lower()
    ranks = positive_int(entry, "ranks", path) if entry.get("ranks") is not None else 1
    devices = entry.get("rank_devices") or []
    if not isinstance(devices, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in devices):
        raise InputError(f"{path}: rank_devices must be a list of GPU ordinals, got {devices!r}")
    if ranks == 1:
        return Key(preset, experts, precision, 1, tokens), None
    gpus = len(set(devices))
    if gpus != ranks:
        return None, (f"{path}: {preset} S={tokens} {precision} ran {ranks} ranks on {max(gpus, 1)} GPU"
                      f"{'s' if gpus > 1 else ''} (rank_devices {devices}); only one rank per GPU is a multi-GPU "
                      f"point")
    if tokens % ranks:
        return None, f"{path}: {preset} S={tokens} {precision}: {tokens} tokens do not split evenly over {ranks} GPUs"
    return Key(preset, experts, precision, ranks, tokens // ranks), None


def load_points(paths: list[str], warn) -> tuple[dict[Key, dict], dict[Key, dict]]:
    """(FlashMoE, torch-ep) records by point; a later record of the same point replaces an earlier one, with a
    warning, and every record left out is reported through `warn`."""
    flashmoe: dict[Key, dict] = {}
    torch_ep: dict[Key, dict] = {}
    others: Counter = Counter()
    for path in paths:
        for e in load_entries(path):
            impl = e.get("impl")
            if impl == "torch-ep":
                key, target, name = torch_ep_key(e, path), torch_ep, "torch-ep"
            elif impl is not None:
                others[f"impl {impl}"] += 1
                continue
            elif str(e.get("backend", "")).lower() in FLASHMOE_HOST_BACKENDS:
                others[f"FlashMoE backend {e['backend']}"] += 1
                continue
            else:
                key, why = flashmoe_key(e, path)
                if key is None:
                    warn(f"warning: left out {why}")
                    continue
                target, name = flashmoe, "FlashMoE"
            if key in target:
                warn(f"warning: {path} repeats {name} {describe(key)}; using the later record")
            target[key] = e
    for what, n in sorted(others.items()):
        warn(f"note: left out {n} record{'s' if n > 1 else ''} of {what} (not part of the scaling tables)")
    return flashmoe, torch_ep


def describe(k: Key) -> str:
    return f"{k.preset} E={k.experts} {k.precision} on {k.gpus} GPU{'s' if k.gpus > 1 else ''} x {k.tokens_per_gpu}"


# ---------------------------------------------------------------------------------------------------------------
# Tables.


def median(records: dict[Key, dict], key: Key) -> float | None:
    r = records.get(key)
    return float(r["median_ms"]) if r is not None else None


def ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den is not None and den > 0 else None


def fmt_ratio(v: float | None, percent: bool = False) -> str:
    if v is None:
        return "–"
    return f"{v:.0%}" if percent else f"{v:.2f}×"


def group_order(g: tuple[str, int, str]) -> tuple:
    preset, experts, prec = g
    names = list(benchlib.PRESETS)
    return (names.index(preset) if preset in names else len(names), preset, experts,
            PRECISION_ORDER.index(prec) if prec in PRECISION_ORDER else len(PRECISION_ORDER), prec)


def own_expert_groups(keys) -> list[tuple[str, int, str]]:
    """(preset, experts, precision) groups at each preset's own expert count (any count for an unknown preset)."""
    groups = {(k.preset, k.experts, k.precision) for k in keys if default_experts(k.preset) in (None, k.experts)}
    return sorted(groups, key=group_order)


def weak_scaling_table(fm: dict[Key, dict], ep: dict[Key, dict], T: int) -> str | None:
    """GPUs 1/2/4/8 (and any other count measured) at T tokens per GPU, one block of rows per preset × precision."""
    keys = [k for k in (*fm, *ep) if k.tokens_per_gpu == T]
    rows = []
    for preset, experts, prec in own_expert_groups(keys):
        present = {k.gpus for k in keys if (k.preset, k.experts, k.precision) == (preset, experts, prec)}
        one = Key(preset, experts, prec, 1, T)
        for n in sorted(set(GPU_COUNTS) | present):
            k = Key(preset, experts, prec, n, T)
            f, t = median(fm, k), median(ep, k)
            rows.append([preset, prec, str(n), str(n * T), benchlib.fmt_ms(f), benchlib.fmt_ms(t),
                         fmt_ratio(ratio(median(fm, one), f), percent=True),
                         fmt_ratio(ratio(median(ep, one), t), percent=True), fmt_ratio(ratio(t, f))])
    if not rows:
        return None
    headers = ["preset", "precision", "GPUs", "tokens", "FlashMoE ms", "torch-ep ms", "FlashMoE efficiency",
               "torch-ep efficiency", "speed-up"]
    return (f"Weak scaling, T = {T} tokens per GPU; efficiency = t(1 GPU, T) / t(N GPUs, N·T); "
            f"speed-up = torch-ep / FlashMoE.\n\n"
            + benchlib.markdown_table(headers, rows, align_right=set(range(2, 9))))


def token_scaling_table(fm: dict[Key, dict], ep: dict[Key, dict], gpus: int, weak_T: int) -> str | None:
    """Tokens per GPU at `gpus` GPUs; None unless some point there has another T than the weak-scaling one."""
    keys = [k for k in (*fm, *ep) if k.gpus == gpus]
    groups = own_expert_groups(keys)
    if not any(k.tokens_per_gpu != weak_T for k in keys if (k.preset, k.experts, k.precision) in groups):
        return None
    rows = []
    for preset, experts, prec in groups:
        for T in sorted({k.tokens_per_gpu for k in keys if (k.preset, k.experts, k.precision) == (preset, experts,
                                                                                                  prec)}):
            k = Key(preset, experts, prec, gpus, T)
            f, t = median(fm, k), median(ep, k)
            rows.append([preset, prec, str(T), str(gpus * T), benchlib.fmt_ms(f), benchlib.fmt_ms(t),
                         fmt_ratio(ratio(t, f))])
    headers = ["preset", "precision", "tokens per GPU", "tokens", "FlashMoE ms", "torch-ep ms", "speed-up"]
    return (f"Token scaling on {gpus} GPUs.\n\n"
            + benchlib.markdown_table(headers, rows, align_right=set(range(2, 7))))


def expert_scaling_table(fm: dict[Key, dict], ep: dict[Key, dict], gpus: int, T: int) -> str | None:
    """Expert counts at `gpus` GPUs and T tokens per GPU; None unless some point there has another expert count
    than its preset's own."""
    keys = [k for k in (*fm, *ep) if k.gpus == gpus and k.tokens_per_gpu == T]
    if not any(default_experts(k.preset) not in (None, k.experts) for k in keys):
        return None
    rows = []
    for preset, prec in sorted({(k.preset, k.precision) for k in keys}, key=lambda g: group_order((g[0], 0, g[1]))):
        for E in sorted({k.experts for k in keys if (k.preset, k.precision) == (preset, prec)}):
            k = Key(preset, E, prec, gpus, T)
            f, t = median(fm, k), median(ep, k)
            per = str(E // gpus) if E % gpus == 0 else f"{E / gpus:.2f}"
            rows.append([preset, prec, str(E), per, benchlib.fmt_ms(f), benchlib.fmt_ms(t), fmt_ratio(ratio(t, f))])
    headers = ["preset", "precision", "experts", "experts per GPU", "FlashMoE ms", "torch-ep ms", "speed-up"]
    return (f"Expert scaling on {gpus} GPUs, T = {T} tokens per GPU.\n\n"
            + benchlib.markdown_table(headers, rows, align_right=set(range(2, 7))))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Markdown scaling tables: FlashMoE expert parallelism vs torch-ep.")
    p.add_argument("files", nargs="+", help="JSON files from flashmoe bench --json and torch_ep_baseline.py")
    p.add_argument("--tokens-per-gpu", type=int, default=8192, help="T of the weak- and expert-scaling tables")
    p.add_argument("--gpus", type=int, default=8, help="GPU count of the token- and expert-scaling tables")
    args = p.parse_args(argv)
    if args.tokens_per_gpu < 1 or args.gpus < 1:
        p.error("--tokens-per-gpu and --gpus must be positive")

    def warn(msg: str) -> None:
        print(msg, file=sys.stderr)

    try:
        fm, ep = load_points(args.files, warn)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not fm and not ep:
        print("error: no FlashMoE GPU or torch-ep records in the files", file=sys.stderr)
        return 2
    tables = [weak_scaling_table(fm, ep, args.tokens_per_gpu),
              token_scaling_table(fm, ep, args.gpus, args.tokens_per_gpu),
              expert_scaling_table(fm, ep, args.gpus, args.tokens_per_gpu)]
    tables = [t for t in tables if t]
    if not tables:
        print(f"error: no record at T = {args.tokens_per_gpu} tokens per GPU or on {args.gpus} GPUs; "
              f"see --tokens-per-gpu and --gpus", file=sys.stderr)
        return 2
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
