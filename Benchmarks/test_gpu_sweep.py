"""scripts/gpu-sweep with the stand-in tools of scripts/gpu_run_fake.py (no GPU), and its output through plots.py:
python3 -m unittest discover -s Benchmarks"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import unittest
from contextlib import redirect_stdout

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import plots  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = os.path.join(ROOT, "scripts", "gpu-sweep")


class GPUSweepDryRunTest(unittest.TestCase):
    def sweep(self, out: str, **env: str) -> subprocess.CompletedProcess:
        full = dict(os.environ, FLASHMOE_SWEEP_TOKENS="1,64", PYTHON=sys.executable, **env)
        return subprocess.run(["bash", SWEEP, out, "--dry-run"], env=full, capture_output=True, text=True,
                              timeout=300)

    def test_dry_run_leaves_six_files_that_plots_reads(self):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "out")
            proc = self.sweep(out)
            self.assertEqual(proc.returncode, 0, proc.stdout[-2000:] + proc.stderr[-2000:])
            self.assertEqual(sorted(os.listdir(out)),
                             ["flashmoe.json", "logs.tgz", "summary.txt", "torch.json", "trace-paper-e64-8192.json",
                              "trace-qwen3-30b-a3b-64.json"])
            with open(os.path.join(out, "flashmoe.json")) as f:
                cases = {(e["preset"], e["tokens"]) for e in json.load(f)}
            # Two token counts for four presets; DeepSeek-V3 at its own two.
            self.assertEqual(len(cases), 4 * 2 + 2)
            self.assertIn(("deepseek-v3", 4096), cases)
            with open(os.path.join(out, "summary.txt")) as f:
                summary = f.read()
            self.assertIn("0 step(s) failed", summary)
            self.assertIn("PASS trace-qwen3-30b-a3b-64", summary)
            self.assertIn("timeline:", summary)
            svg = os.path.join(tmp, "svg")
            with redirect_stdout(io.StringIO()):
                rc = plots.main(["--flashmoe", os.path.join(out, "flashmoe.json"), "--torch",
                                 os.path.join(out, "torch.json"), "--out", svg])
            self.assertEqual(rc, 0)
            self.assertIn("x-floor-bf16.svg", os.listdir(svg))
            self.assertIn("deepseek-v3-bf16.svg", os.listdir(svg))

    def test_a_failing_case_is_counted_and_the_rest_still_run(self):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "out")
            proc = self.sweep(out, FAKE_GPU_FAIL="--preset paper-e32 --precision bf16 --tokens 64")
            self.assertEqual(proc.returncode, 1)
            with open(os.path.join(out, "summary.txt")) as f:
                summary = f.read()
            self.assertIn("FAIL bench-paper-e32-64", summary)
            self.assertIn("PASS bench-mixtral-8x7b-64", summary)

    def test_the_budget_skips_the_remaining_flashmoe_cases(self):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "out")
            proc = self.sweep(out, FLASHMOE_SWEEP_BUDGET="0")
            with open(os.path.join(out, "summary.txt")) as f:
                summary = f.read()
            self.assertIn("SKIP bench-deepseek-v3-4096", summary)
            self.assertIn("PASS torch", summary)
            self.assertEqual(proc.returncode, 0)


if __name__ == "__main__":
    unittest.main()
