#!/usr/bin/env python3
"""SVG charts of FlashMoE's benchmarks, in plain Python (no matplotlib): FlashMoE against the torch baselines per
preset across token counts, and each implementation's time over its roofline floor.

  python3 Benchmarks/plots.py                                   # from the latest GPU run in Benchmarks/RESULTS.md
  python3 Benchmarks/plots.py --flashmoe flashmoe.json --torch torch.json --out Benchmarks/plots
  python3 Benchmarks/plots.py --results Benchmarks/RESULTS.md --section 5e09c5b

Inputs: the JSON lists of `flashmoe bench --json` and `torch_moe_baseline.py --json` (what scripts/gpu-run and
scripts/gpu-sweep write), or the "FlashMoE in detail" and "PyTorch baselines in detail" tables of one "GPU run"
section of RESULTS.md (the newest unless --section names its commit). Outputs, in --out (default Benchmarks/plots):
  <preset>-<precision>.svg   median ms against tokens (both axes log₂ / log₁₀), one line per implementation, and the
                             reference floor of docs/performance.md (Benchmarks/floors.py) as a dashed line
  x-floor-<precision>.svg    median / floor against tokens, one line per preset and implementation, where the floor
                             is the one each record reports (its own routing's experts touched; FlashMoE's from the
                             H200 reference rates, torch's from the rates it measured at startup) and the reference
                             floor otherwise
With --trace FILE.json (from `flashmoe bench --trace`): OUT/FILE.svg, the launch's timeline, one row per block.
Exit status: 0, or 2 when an input is unusable.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
import compare  # noqa: E402
import floors  # noqa: E402

#: Token counts the charts span (the sweep's): 1 … 16384.
TOKEN_RANGE = (1, 16384)
#: Line colours per implementation (colour-blind-safe palette) and per preset for the × floor charts.
IMPL_STYLE = {"flashmoe": ("#0072B2", "FlashMoE"), "grouped": ("#E69F00", "torch _grouped_mm"),
              "loop": ("#009E73", "torch per-expert loop")}
PRESET_COLORS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9"]


class PlotError(Exception):
    """An input that cannot be plotted; the message says what to do."""


# ---------------------------------------------------------------------------------------------------------------
# Inputs: records {preset, tokens, precision, impl, median_ms, floor_ms}.


def load_json(path: str, impl: str | None) -> list[dict]:
    """Records from a bench or torch JSON list; `impl` is forced for FlashMoE files (they have none)."""
    try:
        data = compare.load_entries(path)
    except compare.InputError as e:
        raise PlotError(str(e)) from None
    out = []
    for e in data:
        if e.get("ranks"):
            continue  # expert-parallel records belong to scaling.py
        missing = [k for k in ("preset", "tokens", "precision", "median_ms") if k not in e]
        if missing:
            raise PlotError(f"{path}: an entry lacks {', '.join(missing)}")
        out.append({"preset": str(e["preset"]), "tokens": int(e["tokens"]), "precision": str(e["precision"]).lower(),
                    "impl": impl or str(e.get("impl", "flashmoe")), "median_ms": float(e["median_ms"]),
                    "floor_ms": float(e["floor_ms"]) if e.get("floor_ms") is not None else None})
    return out


def _table_after(lines: list[str], heading: str) -> list[list[str]]:
    """The rows (cells) of the first markdown table after `heading`, or [] when there is none."""
    try:
        i = next(n for n, l in enumerate(lines) if l.strip() == heading)
    except StopIteration:
        return []
    rows, started = [], False
    for line in lines[i + 1:]:
        if line.startswith("|"):
            started = True
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-:") for c in cells):
                rows.append(cells)
        elif started or line.startswith("#"):
            break
    return rows[1:]  # without the header row


def _number(text: str) -> float | None:
    try:
        return float(text.replace("×", "").strip())
    except ValueError:
        return None  # "–": not measured


def load_results(path: str, section: str | None) -> tuple[list[dict], str]:
    """Records from one "## GPU run of …" section of RESULTS.md (the first, or the one whose title has `section`),
    and the section's title."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise PlotError(f"cannot read {path}: {e.strerror}") from None
    parts = re.split(r"(?m)^(?=## )", text)
    runs = [p for p in parts if p.startswith("## GPU run of") and (section is None or section in p.splitlines()[0])]
    if not runs:
        raise PlotError(f"{path} has no '## GPU run of' section" + (f" mentioning {section}" if section else ""))
    lines = runs[0].splitlines()
    out = []
    for r in _table_after(lines, "### FlashMoE in detail"):
        if len(r) >= 7 and _number(r[3]) is not None:
            out.append({"preset": r[0], "tokens": int(r[1]), "precision": r[2], "impl": "flashmoe",
                        "median_ms": _number(r[3]), "floor_ms": _number(r[6])})
    for r in _table_after(lines, "### PyTorch baselines in detail"):
        if len(r) >= 8 and _number(r[4]) is not None:
            out.append({"preset": r[0], "tokens": int(r[1]), "precision": r[3], "impl": r[2],
                        "median_ms": _number(r[4]), "floor_ms": _number(r[7])})
    if not out:
        raise PlotError(f"the section '{lines[0]}' of {path} has no detail tables to plot")
    return out, lines[0].lstrip("# ").strip()


# ---------------------------------------------------------------------------------------------------------------
# SVG.


class Axis:
    """A log axis from `lo` to `hi` (data units) onto pixels `p0` … `p1`."""

    def __init__(self, lo: float, hi: float, p0: float, p1: float):
        if not (0 < lo < hi):
            raise PlotError(f"a log axis needs 0 < low < high, got {lo} and {hi}")
        self.lo, self.hi, self.p0, self.p1 = math.log10(lo), math.log10(hi), p0, p1

    def __call__(self, v: float) -> float:
        return self.p0 + (math.log10(v) - self.lo) / (self.hi - self.lo) * (self.p1 - self.p0)


def decade_ticks(lo: float, hi: float) -> list[float]:
    """1, 2, 5 × powers of ten within [lo, hi]."""
    out = []
    for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1):
        for m in (1, 2, 5):
            v = m * 10.0 ** e
            if lo <= v * (1 + 1e-9) and v <= hi * (1 + 1e-9):
                out.append(v)
    return out


def tick_label(v: float) -> str:
    return f"{v:g}" if v >= 0.01 else f"{v:.0e}"


def svg_chart(title: str, subtitle: str, y_label: str, series: list[dict], y_ref: float | None = None) -> str:
    """A line chart over tokens (log₂ ticks) with a log y axis. Each series: label, color, points [(tokens, y,
    tooltip)], dashed (a dashed line, without markers unless `markers`). `y_ref` draws a horizontal reference line
    (1× for the floor ratio)."""
    w, h, left, right, top, bottom = 760, 460, 70, 210, 56, 52
    ys = [p[1] for s in series for p in s["points"]] + ([y_ref] if y_ref else [])
    if not ys:
        raise PlotError(f"nothing to plot for '{title}'")
    lo, hi = min(ys), max(ys)
    lo, hi = 10 ** math.floor(math.log10(lo) + 1e-9), 10 ** math.ceil(math.log10(hi) - 1e-9)
    if hi <= lo:
        hi = lo * 10
    x = Axis(TOKEN_RANGE[0], TOKEN_RANGE[1], left, w - right)
    y = Axis(lo, hi, h - bottom, top)
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
         f'font-family="Helvetica, Arial, sans-serif" font-size="12">',
         f'<rect width="{w}" height="{h}" fill="white"/>',
         f'<text x="{left}" y="22" font-size="16" font-weight="bold">{html.escape(title)}</text>',
         f'<text x="{left}" y="40" fill="#555">{html.escape(subtitle)}</text>']
    for v in decade_ticks(lo, hi):
        py = y(v)
        o.append(f'<line x1="{left}" x2="{w - right}" y1="{py:.1f}" y2="{py:.1f}" stroke="#e4e4e4"/>')
        o.append(f'<text x="{left - 6}" y="{py + 4:.1f}" text-anchor="end">{tick_label(v)}</text>')
    t = TOKEN_RANGE[0]
    while t <= TOKEN_RANGE[1]:
        px = x(t)
        o.append(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{top}" y2="{h - bottom}" stroke="#f0f0f0"/>')
        o.append(f'<text x="{px:.1f}" y="{h - bottom + 16}" text-anchor="middle">{t}</text>')
        t *= 4
    o.append(f'<rect x="{left}" y="{top}" width="{w - left - right}" height="{h - top - bottom}" fill="none" '
             f'stroke="#888"/>')
    o.append(f'<text x="{(left + w - right) / 2:.0f}" y="{h - 12}" text-anchor="middle">tokens per call (S)</text>')
    o.append(f'<text transform="translate(18 {(top + h - bottom) / 2:.0f}) rotate(-90)" text-anchor="middle">'
             f'{html.escape(y_label)}</text>')
    if y_ref:
        py = y(y_ref)
        o.append(f'<line x1="{left}" x2="{w - right}" y1="{py:.1f}" y2="{py:.1f}" stroke="#444" '
                 f'stroke-dasharray="2 3"/>')
    for n, s in enumerate(series):
        pts = sorted(s["points"])
        dash = ' stroke-dasharray="6 4"' if s.get("dashed") else ""
        if len(pts) > 1:
            path = " ".join(f"{x(p[0]):.1f},{y(p[1]):.1f}" for p in pts)
            o.append(f'<polyline points="{path}" fill="none" stroke="{s["color"]}" stroke-width="2"{dash}/>')
        if not s.get("dashed") or s.get("markers"):
            # Solid series: filled markers; dashed ones with markers (the torch lines): hollow.
            fill = s["color"] if not s.get("dashed") else "white"
            for p in pts:
                o.append(f'<circle cx="{x(p[0]):.1f}" cy="{y(p[1]):.1f}" r="4" fill="{fill}" stroke="{s["color"]}" '
                         f'stroke-width="1.5"><title>{html.escape(p[2])}</title></circle>')
        ly = top + 14 + 20 * n
        lx = w - right + 14
        o.append(f'<line x1="{lx}" x2="{lx + 24}" y1="{ly - 4}" y2="{ly - 4}" stroke="{s["color"]}" '
                 f'stroke-width="2"{dash}/>')
        o.append(f'<text x="{lx + 30}" y="{ly}">{html.escape(s["label"])}</text>')
    o.append("</svg>")
    return "\n".join(o) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Charts.


def floor_of(r: dict) -> float:
    """The record's own floor, else the reference floor of docs/performance.md (uniform experts-touched estimate)."""
    if r.get("floor_ms"):
        return r["floor_ms"]
    return floors.reference_floor(r["preset"], r["tokens"], r["precision"])["floor_ms"]


def preset_chart(records: list[dict], preset: str, precision: str, source: str) -> str:
    """Median ms against tokens for each implementation, and the reference floor."""
    series = []
    for impl, (color, label) in IMPL_STYLE.items():
        pts = [(r["tokens"], r["median_ms"], f"{label}, S={r['tokens']}: {r['median_ms']:.3f} ms")
               for r in records if (r["preset"], r["precision"], r["impl"]) == (preset, precision, impl)]
        if pts:
            series.append({"label": label, "color": color, "points": pts})
    if preset in benchlib.PRESETS and precision in floors.REFERENCE_TFLOPS:
        pts = []
        t = TOKEN_RANGE[0]
        while t <= TOKEN_RANGE[1]:
            f = floors.reference_floor(preset, t, precision)["floor_ms"]
            pts.append((t, f, f"floor S={t}: {f:.3f} ms"))
            t *= 2
        series.append({"label": "floor (reference)", "color": "#555555", "points": pts, "dashed": True})
    return svg_chart(f"{preset}, {precision}: time per layer call", source, "median ms (log scale)", series)


def floor_chart(records: list[dict], precision: str, source: str) -> str:
    """Median / floor against tokens: FlashMoE solid per preset, the faster torch implementation dashed."""
    series = []
    presets = [p for p in benchlib.PRESETS if any(r["preset"] == p and r["precision"] == precision for r in records)]
    presets += sorted({r["preset"] for r in records if r["precision"] == precision} - set(presets))
    for n, preset in enumerate(presets):
        color = PRESET_COLORS[n % len(PRESET_COLORS)]
        mine = [r for r in records if (r["preset"], r["precision"]) == (preset, precision)]
        fm = [(r["tokens"], r["median_ms"] / floor_of(r), f"FlashMoE {preset} S={r['tokens']}: "
               f"{r['median_ms'] / floor_of(r):.2f}× floor") for r in mine if r["impl"] == "flashmoe"]
        best: dict[int, dict] = {}
        for r in mine:
            if r["impl"] != "flashmoe" and (r["tokens"] not in best or r["median_ms"] < best[r["tokens"]]["median_ms"]):
                best[r["tokens"]] = r
        th = [(t, r["median_ms"] / floor_of(r), f"best torch ({r['impl']}) {preset} S={t}: "
               f"{r['median_ms'] / floor_of(r):.2f}× floor") for t, r in best.items()]
        if fm:
            series.append({"label": f"{preset} FlashMoE", "color": color, "points": fm})
        if th:
            series.append({"label": f"{preset} best torch", "color": color, "points": th, "dashed": True,
                           "markers": True})
    return svg_chart(f"Time over the roofline floor, {precision}", source, "median / floor (log scale; 1 = floor)",
                     series, y_ref=1.0)


#: Fill colours of the timeline's event kinds (the `cat` of KernelTrace.chromeJSON); phases are drawn as a band.
TRACE_COLORS = {"gate": "#009E73", "route": "#CC79A7", "scan": "#000000", "place": "#56B4E9", "grid barrier": "#999999",
                "GEMM0": "#0072B2", "GEMM1": "#E69F00", "wait for GEMM1 rows": "#BBBBBB", "combine": "#D55E00",
                "route token": "#E7A9CF"}
TRACE_PHASES = {"gate phase": "#E8F5EF", "expert phase": "#EAF1F8"}


def load_trace(path: str) -> list[dict]:
    """The complete ("X") events of a `flashmoe bench --trace` file."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise PlotError(f"cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise PlotError(f"{path} is not JSON: {e}") from None
    events = data.get("traceEvents") if isinstance(data, dict) else None
    if not isinstance(events, list):
        raise PlotError(f"{path} has no traceEvents list (write it with flashmoe bench --trace)")
    out = [e for e in events if isinstance(e, dict) and e.get("ph") == "X"]
    if not out:
        raise PlotError(f"{path} holds no events")
    return out


def trace_chart(events: list[dict], title: str) -> str:
    """One row per block over time: phases as a pale band, tasks as coloured bars (block-level in the upper part of
    the row, the warps' combines in the lower part)."""
    blocks = sorted({int(e["pid"]) for e in events})
    row = {b: i for i, b in enumerate(blocks)}
    end = max(float(e["ts"]) + float(e["dur"]) for e in events)
    left, right, top, rh = 70, 170, 56, 6
    w, h = 1000, top + rh * len(blocks) + 50
    sx = (w - left - right) / end if end > 0 else 1.0
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
         f'font-family="Helvetica, Arial, sans-serif" font-size="12">', f'<rect width="{w}" height="{h}" fill="white"/>',
         f'<text x="{left}" y="22" font-size="16" font-weight="bold">{html.escape(title)}</text>',
         f'<text x="{left}" y="40" fill="#555">{len(events)} events, {len(blocks)} blocks, {end:.1f} µs</text>']
    for e in sorted(events, key=lambda e: (e.get("cat") not in TRACE_PHASES, int(e.get("tid", 0)) > 0)):
        cat, y0 = e.get("cat", ""), top + rh * row[int(e["pid"])]
        x, dx = left + float(e["ts"]) * sx, max(float(e["dur"]) * sx, 0.3)
        if cat in TRACE_PHASES:
            o.append(f'<rect x="{x:.1f}" y="{y0}" width="{dx:.1f}" height="{rh}" fill="{TRACE_PHASES[cat]}"/>')
            continue
        warp = int(e.get("tid", 0)) > 0
        y, hh = (y0 + rh * 0.6, rh * 0.4) if warp else (y0 + 0.5, rh * 0.55)
        o.append(f'<rect x="{x:.2f}" y="{y:.1f}" width="{dx:.2f}" height="{hh:.1f}" '
                 f'fill="{TRACE_COLORS.get(cat, "#444444")}"><title>{html.escape(str(e.get("name", cat)))}: '
                 f'{float(e["dur"]):.2f} µs</title></rect>')
    t, step = 0.0, 10 ** math.floor(math.log10(end)) if end > 0 else 1.0
    while t <= end + 1e-9:
        px = left + t * sx
        o.append(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{top}" y2="{h - 44}" stroke="#00000022"/>')
        o.append(f'<text x="{px:.1f}" y="{h - 30}" text-anchor="middle">{t:g}</text>')
        t += step
    o.append(f'<text x="{(left + w - right) / 2:.0f}" y="{h - 10}" text-anchor="middle">µs since the first event</text>')
    o.append(f'<text transform="translate(20 {(top + h - 50) / 2:.0f}) rotate(-90)" text-anchor="middle">block</text>')
    for n, (cat, color) in enumerate(list(TRACE_COLORS.items()) + list(TRACE_PHASES.items())):
        ly = top + 12 + 18 * n
        o.append(f'<rect x="{w - right + 12}" y="{ly - 9}" width="14" height="10" fill="{color}" stroke="#888" '
                 f'stroke-width="0.5"/><text x="{w - right + 32}" y="{ly}">{html.escape(cat)}</text>')
    o.append("</svg>")
    return "\n".join(o) + "\n"


def write_charts(records: list[dict], out: str, source: str) -> list[str]:
    """Every chart the records allow, written to `out`; returns the paths."""
    os.makedirs(out, exist_ok=True)
    written = []
    pairs = sorted({(r["preset"], r["precision"]) for r in records},
                   key=lambda k: (list(benchlib.PRESETS).index(k[0]) if k[0] in benchlib.PRESETS else 99, k))
    charts = [(f"{p}-{q}.svg", preset_chart(records, p, q, source)) for p, q in pairs]
    charts += [(f"x-floor-{q}.svg", floor_chart(records, q, source)) for q in sorted({q for _, q in pairs})]
    for name, text in charts:
        path = os.path.join(out, name)
        with open(path, "w") as f:
            f.write(text)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description="SVG charts of FlashMoE's benchmarks (no matplotlib needed).")
    p.add_argument("--flashmoe", action="append", default=[], help="flashmoe bench --json file (repeatable)")
    p.add_argument("--torch", action="append", default=[], help="torch_moe_baseline.py --json file (repeatable)")
    p.add_argument("--results", default=os.path.join(here, "RESULTS.md"),
                   help="RESULTS.md to read when no JSON is given")
    p.add_argument("--section", default=None, help="with --results: the GPU run whose title contains this (a commit)")
    p.add_argument("--source", default=None, help="the subtitle of every chart (default: where the data came from)")
    p.add_argument("--out", default=os.path.join(here, "plots"), help="folder for the SVG files")
    p.add_argument("--trace", action="append", default=[],
                   help="flashmoe bench --trace file: draw its timeline as OUT/<name>.svg instead (repeatable)")
    args = p.parse_args(argv)
    try:
        if args.trace:
            os.makedirs(args.out, exist_ok=True)
            for t in args.trace:
                path = os.path.join(args.out, os.path.splitext(os.path.basename(t))[0] + ".svg")
                with open(path, "w") as f:
                    f.write(trace_chart(load_trace(t), args.source or f"timeline of {os.path.basename(t)}"))
                print(f"wrote {path}")
            return 0
        if args.flashmoe or args.torch:
            records = [r for f in args.flashmoe for r in load_json(f, "flashmoe")]
            records += [r for f in args.torch for r in load_json(f, None)]
            source = args.source or "from " + ", ".join(os.path.basename(f) for f in args.flashmoe + args.torch)
        else:
            records, title = load_results(args.results, args.section)
            source = args.source or f"{title} (Benchmarks/RESULTS.md)"
        if not records:
            raise PlotError("no benchmark records in the inputs")
        for path in write_charts(records, args.out, source):
            print(f"wrote {path}")
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
