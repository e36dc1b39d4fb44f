"""The GPU tooling without a GPU: gpu_summary.py on results shaped like gpu_checks.py's and torch_op_bench.py's,
torch_op_bench.py's command line, and scripts/gpu-python's refusal without a library. Plain Python."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "Benchmarks"))

import gpu_summary  # noqa: E402
import torch_op_bench  # noqa: E402  (imports torch only inside main)

CHECKS = [
    {"check": "families-fp32", "status": "PASS", "seconds": 12.0, "detail": {
        "mixtral": {"blocks": 2, "logits_rel_error": 3e-7, "generate_identical": True,
                    "first_differing_position": None}}},
    {"check": "families-bf16", "status": "PASS", "seconds": 5.0, "detail": {
        "mixtral": {"patched_vs_original": 4e-3, "original_bf16_vs_fp32": 5e-3, "patched_bf16_vs_fp32": 5e-3}}},
    {"check": "graph-replays", "status": "PASS", "seconds": 2.0, "detail": {"replays": 100, "mismatches": 0}},
    {"check": "kernel-fault", "status": "FAIL", "seconds": 1.0, "detail": {"error": "CheckFailed: status 3"}},
    {"check": "bad-inputs", "status": "PASS", "seconds": 1.0, "detail": {"x float32": "TypeError: ...", "note": "x"}},
]
BENCH = {
    "overhead": [{"tokens": 1, "shape": "H256 I128 E8 k2", "bare_idle_ms": 0.02, "op_idle_ms": 0.026,
                  "module_idle_ms": 0.029, "bare_loop_ms": 0.01, "op_loop_ms": 0.01, "module_loop_ms": 0.01,
                  "bare_host_us": 3.0, "op_host_us": 9.0, "module_host_us": 12.0, "op_overhead_us": 6.0,
                  "module_overhead_us": 9.0, "op_out_overhead_us": 2.0, "op_y_overhead_us": 4.0}],
    "breakdown": [{"tokens": 1, "shape": "H256 I128 E8 k2", "bare_prelaunch_us": 0.5, "op_prelaunch_us": 7.0,
                   "op_y_prelaunch_us": 5.0, "op_out_prelaunch_us": 4.0, "module_prelaunch_us": 6.0,
                   "alloc_y_us": 2.0, "alloc_outputs_us": 6.0, "op_stub_host_us": 8.0, "op_y_stub_host_us": 5.5,
                   "op_interleaved_overhead_us": 6.5}],
    "decode": {"op_loop_ms": 0.44, "bare_loop_ms": 0.435, "op_idle_ms": 0.45, "bare_idle_ms": 0.44,
               "flashmoe_bench_ms": None, "op_vs_reference": 1.02, "reference": "bare ctypes call",
               "within_5_percent": True},
    "model": {"vocab": 4096, "patched_vs_eager_rel_error": 5e-3, "cases": {"decode-b1": {
        "transformers eager": {"block_ms": 2.0, "model_ms": 5.0},
        "transformers grouped_mm": {"block_ms": 1.0, "model_ms": 3.0},
        "flashmoe": {"block_ms": 0.5, "model_ms": 2.0},
        "block_speedup_vs_eager": 4.0, "block_speedup_vs_fastest": 2.0, "block_fastest_builtin":
            "transformers grouped_mm", "model_speedup_vs_eager": 2.5, "model_speedup_vs_fastest": 1.5,
        "model_fastest_builtin": "transformers grouped_mm"}}},
}


class SummaryTest(unittest.TestCase):
    def run_summary(self, checks, bench) -> str:
        with tempfile.TemporaryDirectory() as tmp:
            if checks is not None:
                Path(tmp, "gpu_checks.json").write_text(json.dumps(checks))
            if bench is not None:
                Path(tmp, "torch_op_bench.json").write_text(json.dumps(bench))
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                self.assertEqual(gpu_summary.main([tmp]), 0)
            return buf.getvalue()

    def test_full_results(self):
        text = self.run_summary(CHECKS, BENCH)
        self.assertIn("| families-fp32 | PASS | 12.0 | mixtral 3.0e-07 gen = |", text)
        self.assertIn("| kernel-fault | FAIL | 1.0 | CheckFailed: status 3 |", text)
        self.assertIn("| H256 I128 E8 k2 | 1 | 20.0 | 26.0 | 6.0 | 4.0 | 2.0 | 9.0 | 3.0 | 9.0 | yes |", text)
        self.assertIn("| H256 I128 E8 k2 | 1 | 0.5 | 7.0 | 5.0 | 4.0 | 6.0 | 2.0 | 6.0 | 8.0 | 5.5 | 6.5 |", text)
        self.assertIn("1.020 (bare ctypes call)", text)
        self.assertIn("| decode-b1 | block | 2.000 | 1.000 (grouped_mm) | 0.500 | 4.00× | 2.00× |", text)
        self.assertIn("4 passed, 1 failed ['kernel-fault']", text)

    def test_missing_and_failed_sections(self):
        text = self.run_summary(None, {"overhead": {"error": "RuntimeError: x"}, "model": {"error": "boom"}})
        self.assertIn("gpu_checks.json", text)
        self.assertIn("overhead: {'error': 'RuntimeError: x'}", text)
        self.assertIn("model: {'error': 'boom'}", text)


class BenchArgsTest(unittest.TestCase):
    def test_sections(self):
        self.assertEqual(torch_op_bench.parse_args([]).sections, list(torch_op_bench.SECTIONS))
        self.assertEqual(torch_op_bench.parse_args(["--sections", "decode"]).sections, ["decode"])
        with contextlib.redirect_stderr(io.StringIO()), self.assertRaises(SystemExit):
            torch_op_bench.parse_args(["--sections", "speed"])


class GpuPythonScriptTest(unittest.TestCase):
    def test_refuses_without_library(self):
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run([str(REPO / "scripts" / "gpu-python"), tmp], capture_output=True, text=True,
                                  env=dict(os.environ, FLASHMOE_LIB=str(Path(tmp) / "missing.so")))
        self.assertEqual(proc.returncode, 2)
        self.assertIn("scripts/build-lib", proc.stderr)


if __name__ == "__main__":
    unittest.main()
