"""Unit tests of plots.py and floors.py (no GPU, no matplotlib): python3 -m unittest discover -s Benchmarks"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import unittest
import xml.etree.ElementTree as ET
from contextlib import redirect_stderr, redirect_stdout

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import floors  # noqa: E402
import plots  # noqa: E402

SVG = "{http://www.w3.org/2000/svg}"

RESULTS = """# FlashMoE benchmark results

## GPU run of 2026-11-30: NVIDIA H200, commit abc1234

### FlashMoE in detail

| preset | tokens | precision | median ms | min ms | TFLOP/s | floor ms | × floor | workspace MiB |
|---|---:|---|---:|---:|---:|---:|---:|---:|
| paper-e64 | 8192 | bf16 | 0.700 | 0.690 | 395.0 | 0.358 | 1.96× | 298.5 |
| qwen3-30b-a3b | 64 | bf16 | 0.400 | 0.390 | 12.0 | 0.283 | 1.41× | 5.7 |
| qwen3-30b-a3b | 4096 | bf16 | 0.900 | 0.890 | 340.0 | 0.403 | 2.23× | 362.7 |

Device: NVIDIA H200.

### PyTorch baselines in detail

| preset | tokens | impl | precision | median ms | min ms | TFLOP/s | floor ms | × floor |
|---|---:|---|---|---:|---:|---:|---:|---:|
| paper-e64 | 8192 | grouped | bf16 | 1.448 | 1.416 | 191.4 | 0.361 | 4.01× |
| paper-e64 | 8192 | loop | bf16 | 8.969 | 8.843 | 30.9 | 0.361 | 24.83× |
| qwen3-30b-a3b | 64 | grouped | bf16 | 0.707 | 0.672 | 6.9 | 0.288 | 2.46× |

## GPU run of 2026-11-29: NVIDIA H200, commit old0000

### FlashMoE in detail

| preset | tokens | precision | median ms | min ms | TFLOP/s | floor ms | × floor | workspace MiB |
|---|---:|---|---:|---:|---:|---:|---:|---:|
| paper-e64 | 8192 | bf16 | 0.800 | 0.790 | 350.0 | 0.358 | 2.23× | 298.5 |
"""


class FloorsTest(unittest.TestCase):
    def test_issue_table_floors(self):
        # Issue 11's floors (flashmoe bench, H200 reference rates) from the same method.
        expect = {("paper-e64", 8192, "bf16"): 0.358, ("paper-e64", 8192, "tf32"): 0.668,
                  ("qwen3-30b-a3b", 16384, "bf16"): 1.611, ("qwen3-30b-a3b", 64, "bf16"): 0.283,
                  ("qwen3-30b-a3b", 1, "bf16"): 0.018, ("paper-e64", 128, "bf16"): 0.252,
                  ("mixtral-8x7b", 4096, "bf16"): 3.734}
        for (p, s, q), ms in expect.items():
            self.assertAlmostEqual(floors.reference_floor(p, s, q)["floor_ms"], ms, places=3, msg=f"{p} {s} {q}")

    def test_deepseek_floor_follows_the_experts_touched(self):
        # flashmoe bench reported 2.875 ms at S=64: its routing touched 136 of 256 experts (uniform: 222).
        self.assertAlmostEqual(floors.reference_floor("deepseek-v3", 64, "bf16", touched=136)["floor_ms"], 2.875, 3)
        uniform = floors.reference_floor("deepseek-v3", 64, "bf16")
        self.assertAlmostEqual(uniform["touched"], 222.4, places=1)
        self.assertEqual(uniform["bound"], "memory")

    def test_bound_names_the_larger_time(self):
        self.assertEqual(floors.reference_floor("mixtral-8x7b", 4096, "bf16")["bound"], "compute")
        self.assertEqual(floors.reference_floor("qwen3-30b-a3b", 1, "bf16")["bound"], "memory")

    def test_bytes_mirror_roofline_swift(self):
        # qwen3 S=1: 8 experts × 3 × 2048 × 768 × 2 B + router 128 × 2048 × 2 + input 2048 × 2 + output 2048 × 4.
        b = floors.flashmoe_bytes(floors.benchlib.PRESETS["qwen3-30b-a3b"], 1, 8, "bf16")
        self.assertEqual(b, 8 * 3 * 2048 * 768 * 2 + 128 * 2048 * 2 + 2048 * 6)

    def test_bad_inputs_are_value_errors(self):
        for args in (("nope", 1, "bf16"), ("paper-e64", 1, "int8"), ("paper-e64", 0, "bf16")):
            with self.assertRaises(ValueError):
                floors.reference_floor(*args)

    def test_markdown_lists_every_issue_case(self):
        out = io.StringIO()
        with redirect_stdout(out):
            self.assertEqual(floors.main([]), 0)
        self.assertEqual(out.getvalue().count("\n| "), len(floors.ISSUE_CASES))  # rows after the header


class PlotsTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.dir = self.tmp.name

    def tearDown(self):
        self.tmp.cleanup()

    def write(self, name: str, content) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(content if isinstance(content, str) else json.dumps(content))
        return path

    def test_results_section_is_the_newest_unless_named(self):
        path = self.write("RESULTS.md", RESULTS)
        records, title = plots.load_results(path, None)
        self.assertIn("abc1234", title)
        self.assertEqual(len(records), 6)
        fm = [r for r in records if r["impl"] == "flashmoe"]
        self.assertEqual([(r["preset"], r["tokens"], r["median_ms"], r["floor_ms"]) for r in fm][0],
                         ("paper-e64", 8192, 0.7, 0.358))
        loop = next(r for r in records if r["impl"] == "loop")
        self.assertEqual((loop["precision"], loop["median_ms"], loop["floor_ms"]), ("bf16", 8.969, 0.361))
        old, title = plots.load_results(path, "old0000")
        self.assertEqual(len(old), 1)
        self.assertEqual(old[0]["median_ms"], 0.8)
        with self.assertRaises(plots.PlotError):
            plots.load_results(path, "nothere")

    def test_json_inputs(self):
        fm = self.write("f.json", [{"preset": "paper-e64", "tokens": 64, "precision": "bf16", "median_ms": 0.3,
                                     "floor_ms": 0.2}, {"preset": "paper-e64", "tokens": 64, "precision": "bf16",
                                                         "median_ms": 0.5, "ranks": 8}])
        recs = plots.load_json(fm, "flashmoe")
        self.assertEqual(len(recs), 1)  # the --ranks record is left out
        self.assertEqual(recs[0]["impl"], "flashmoe")
        th = self.write("t.json", [{"preset": "paper-e64", "tokens": 64, "precision": "bf16", "impl": "grouped",
                                     "median_ms": 0.6, "floor_ms": None}])
        self.assertEqual(plots.load_json(th, None)[0]["impl"], "grouped")
        bad = self.write("b.json", [{"preset": "paper-e64"}])
        with self.assertRaises(plots.PlotError):
            plots.load_json(bad, None)
        with self.assertRaises(plots.PlotError):
            plots.load_json(self.write("n.json", "not json"), None)

    def test_floor_of_prefers_the_records_own_floor(self):
        self.assertEqual(plots.floor_of({"preset": "paper-e64", "tokens": 8192, "precision": "bf16",
                                         "floor_ms": 0.5}), 0.5)
        self.assertAlmostEqual(plots.floor_of({"preset": "paper-e64", "tokens": 8192, "precision": "bf16",
                                               "floor_ms": None}), 0.358, places=3)

    def test_chart_is_svg_with_one_marker_per_point_on_log_axes(self):
        series = [{"label": "a", "color": "#000", "points": [(1, 0.02, "p1"), (1024, 2.0, "p2"), (16384, 20.0, "p3")]},
                  {"label": "floor", "color": "#555", "points": [(1, 0.01, ""), (16384, 10.0, "")], "dashed": True}]
        root = ET.fromstring(plots.svg_chart("T", "S", "ms", series))
        self.assertEqual(root.tag, SVG + "svg")
        circles = root.findall(f"{SVG}circle")
        self.assertEqual(len(circles), 3)  # dashed reference lines have no markers
        xs = [float(c.get("cx")) for c in circles]
        ys = [float(c.get("cy")) for c in circles]
        self.assertTrue(xs[0] < xs[1] < xs[2] and ys[0] > ys[1] > ys[2])  # larger values higher up
        # Log axes: the y distance from 0.02 to 2.0 is twice that from 2.0 to 20.0 (two decades vs one).
        self.assertAlmostEqual((ys[0] - ys[1]) / (ys[1] - ys[2]), 2.0, places=3)
        self.assertEqual([c.find(f"{SVG}title").text for c in circles], ["p1", "p2", "p3"])
        self.assertEqual(len(root.findall(f"{SVG}polyline")), 2)
        with self.assertRaises(plots.PlotError):
            plots.svg_chart("T", "S", "ms", [])

    def test_trace_timeline_draws_one_row_per_block(self):
        events = [
            {"name": "expert phase", "cat": "expert phase", "ph": "X", "ts": 0.0, "dur": 100.0, "pid": 0, "tid": 0},
            {"name": "GEMM0 e3 rb2 n5", "cat": "GEMM0", "ph": "X", "ts": 10.0, "dur": 20.0, "pid": 0, "tid": 0},
            {"name": "combine t7", "cat": "combine", "ph": "X", "ts": 50.0, "dur": 2.0, "pid": 5, "tid": 3},
            {"name": "process_name", "ph": "M", "pid": 0, "args": {"name": "block 0"}},
        ]
        path = self.write("t.json", {"traceEvents": events, "displayTimeUnit": "ns"})
        loaded = plots.load_trace(path)
        self.assertEqual(len(loaded), 3)  # metadata events are not drawn
        root = ET.fromstring(plots.trace_chart(loaded, "T"))
        bars = {r.find(f"{SVG}title").text: r for r in root.findall(f"{SVG}rect") if r.find(f"{SVG}title") is not None}
        self.assertEqual(set(bars), {"GEMM0 e3 rb2 n5: 20.00 µs", "combine t7: 2.00 µs"})
        gemm, combine = bars["GEMM0 e3 rb2 n5: 20.00 µs"], bars["combine t7: 2.00 µs"]
        self.assertEqual(gemm.get("fill"), plots.TRACE_COLORS["GEMM0"])
        self.assertGreater(float(combine.get("y")), float(gemm.get("y")))  # block 5's row is below block 0's
        self.assertAlmostEqual(float(gemm.get("width")) * 10, float(combine.get("width")) * 100, places=1)
        out = os.path.join(self.dir, "svg")
        with redirect_stdout(io.StringIO()):
            self.assertEqual(plots.main(["--trace", path, "--out", out]), 0)
        self.assertEqual(os.listdir(out), ["t.svg"])
        with self.assertRaises(plots.PlotError):
            plots.load_trace(self.write("e.json", {"traceEvents": []}))

    def test_main_writes_every_chart_from_results(self):
        path = self.write("RESULTS.md", RESULTS)
        out = os.path.join(self.dir, "svg")
        with redirect_stdout(io.StringIO()):
            self.assertEqual(plots.main(["--results", path, "--out", out]), 0)
        self.assertEqual(sorted(os.listdir(out)),
                         ["paper-e64-bf16.svg", "qwen3-30b-a3b-bf16.svg", "x-floor-bf16.svg"])
        with open(os.path.join(out, "x-floor-bf16.svg")) as f:
            text = f.read()
        ET.fromstring(text)
        self.assertIn("1.96× floor", text)  # FlashMoE paper-e64: 0.700 / 0.358
        self.assertIn("best torch (grouped) paper-e64 S=8192: 4.01× floor", text)
        err = io.StringIO()
        with redirect_stderr(err):
            self.assertEqual(plots.main(["--results", os.path.join(self.dir, "none.md"), "--out", out]), 2)
        self.assertIn("cannot read", err.getvalue())


if __name__ == "__main__":
    unittest.main()
