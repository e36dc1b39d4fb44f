"""Unit tests of the benchmark scripts' plain-Python parts (no GPU, no torch):

    python3 -m unittest discover -s Benchmarks -p 'test_*.py'
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
import compare  # noqa: E402
import torch_moe_baseline as tmb  # noqa: E402  (imports without torch by design)

try:
    import numpy as np

    import numpy_matmul
except ImportError:  # numpy is optional for the rest of the suite
    np = None


class FormulaTests(unittest.TestCase):
    def test_flops_paper_e64(self):
        spec = benchlib.PRESETS["paper-e64"]
        expected = 2 * 8192 * 2 * 2048 * 2048 * 2 + 2 * 8192 * 2048 * 64
        self.assertEqual(benchlib.layer_flops(spec, 8192), expected)

    def test_flops_deepseek_counts_gated_and_shared(self):
        spec = benchlib.PRESETS["deepseek-v3"]
        routed = 2 * 64 * 8 * 7168 * 2048 * 3
        self.assertEqual(benchlib.layer_flops(spec, 64), routed + 2 * 64 * 7168 * 256 + 2 * 64 * 7168 * 2048 * 3)

    def test_bytes_deepseek_decode_matches_design_note(self):
        # docs/performance.md: about 222 experts touched at S=64 (uniform estimate), 19.5 GB of weights.
        spec = benchlib.PRESETS["deepseek-v3"]
        b = benchlib.layer_bytes(spec, 64, 222, 2)
        experts = 222 * 3 * 7168 * 2048 * 2
        self.assertAlmostEqual(experts / 1e9, 19.55, places=2)
        self.assertEqual(b, experts + 256 * 7168 * 2 + 256 * 4 + 3 * 7168 * 2048 * 2 + 2 * 64 * 7168 * 2)

    def test_expected_touched(self):
        spec = benchlib.PRESETS["deepseek-v3"]
        self.assertAlmostEqual(benchlib.expected_experts_touched(spec, 64), 256 * (1 - (1 - 8 / 256) ** 64))
        self.assertGreater(benchlib.expected_experts_touched(spec, 64), 220)
        self.assertAlmostEqual(benchlib.expected_experts_touched(spec, 1 << 20), 256.0)

    def test_floor_is_max_of_compute_and_bytes(self):
        self.assertAlmostEqual(benchlib.floor_ms(1e12, 0, 1000, 1), 1.0)  # 1 TFLOP at 1000 TFLOP/s
        self.assertAlmostEqual(benchlib.floor_ms(1, 4.2e9, 1000, 4200), 1.0)  # 4.2 GB at 4200 GB/s
        with self.assertRaises(ValueError):
            benchlib.floor_ms(1, 1, 0, 1)

    def test_presets_mirror_swift(self):
        q = benchlib.PRESETS["qwen3-30b-a3b"]
        self.assertEqual((q.hidden, q.inter, q.experts, q.top_k, q.gated, q.tokens), (2048, 768, 128, 8, True,
                                                                                      (4096, 64)))
        m = benchlib.PRESETS["mixtral-8x7b"]
        self.assertEqual((m.hidden, m.inter, m.experts, m.top_k), (4096, 14336, 8, 2))
        d = benchlib.PRESETS["deepseek-v3"]
        self.assertEqual((d.groups, d.groups_kept, d.scaling, d.shared_inter), (8, 4, 2.5, 2048))


class ParseTests(unittest.TestCase):
    def test_parse_list(self):
        self.assertEqual(benchlib.parse_list("b, a,b", ["a", "b"], "x"), ["b", "a"])
        with self.assertRaisesRegex(ValueError, "unknown x c: choose from a, b"):
            benchlib.parse_list("a,c", ["a", "b"], "x")
        with self.assertRaises(ValueError):
            benchlib.parse_list(" , ", ["a"], "x")

    def test_parse_tokens(self):
        self.assertEqual(benchlib.parse_tokens("4096,64,4096"), [4096, 64])
        for bad in ("0", "-3", "12x", ""):
            with self.assertRaises(ValueError, msg=bad):
                benchlib.parse_tokens(bad)

    def test_torch_cli_defaults(self):
        a = tmb.parse_args([])
        self.assertEqual(a.presets, list(benchlib.PRESETS))
        self.assertEqual((a.impls, a.precisions, a.tokens), (["loop", "grouped"], ["tf32", "bf16"], None))
        self.assertGreaterEqual(a.repeats, 20)
        self.assertGreaterEqual(a.warmup, 5)
        self.assertGreaterEqual(a.input_sets, 2)

    def test_torch_cli_rejects_bad_input(self):
        for argv in (["--presets", "nope"], ["--impls", "fast"], ["--precisions", "fp16"], ["--tokens", "0"],
                     ["--repeats", "0"], ["--group-align", "0"], ["--skip", "nomatch"], ["--skip", "a:b:c:d"],
                     ["--json", "/nonexistent-dir/x.json"], ["--fp8-row-align", "0"]):
            with self.subTest(argv=argv), contextlib.redirect_stderr(io.StringIO()):
                with self.assertRaises(SystemExit):
                    tmb.parse_args(argv)

    def test_torch_cli_skip(self):
        a = tmb.parse_args(["--skip", "deepseek-v3::tf32,paper-*:grouped", "--tokens", "128,64"])
        self.assertEqual(a.tokens, [128, 64])
        self.assertTrue(tmb.is_skipped(a.skip, "deepseek-v3", "loop", "tf32"))
        self.assertFalse(tmb.is_skipped(a.skip, "deepseek-v3", "loop", "bf16"))
        self.assertTrue(tmb.is_skipped(a.skip, "paper-e32", "grouped", "bf16"))
        self.assertFalse(tmb.is_skipped(a.skip, "paper-e32", "loop", "bf16"))

    def test_torch_main_without_torch_or_gpu_fails_cleanly(self):
        try:
            import torch  # noqa: F401
            self.skipTest("torch is installed here")
        except ImportError:
            pass
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            self.assertEqual(tmb.main(["--presets", "paper-e32"]), 2)
        self.assertIn("cannot import torch", err.getvalue())


class RouterTests(unittest.TestCase):
    def test_softmax_topk_renormalised(self):
        ids, w, probs = benchlib.reference_softmax_topk([0.0, 2.0, 1.0, 2.0], 2)
        self.assertEqual(ids, [1, 3])  # tie between 1 and 3: both chosen, lower index first
        self.assertAlmostEqual(w[0], 0.5)
        self.assertAlmostEqual(sum(probs), 1.0)
        ids, _, _ = benchlib.reference_softmax_topk([5.0, 5.0, 5.0], 1)
        self.assertEqual(ids, [0])
        ids, w, _ = benchlib.reference_softmax_topk([0.0, math.log(3.0)], 2, renormalize=False)
        self.assertAlmostEqual(w[0], 0.75)

    def test_deepseek_group_limit_beats_single_best_expert(self):
        # 8 experts, 4 groups of 2, keep 2 groups, k=2. Expert 0 is the single best, but its group (0) has a weak
        # partner; groups 2 and 3 have the best sums of two, so the choice comes from them.
        logits = [4.0, -4.0, 0.0, 0.0, 1.5, 1.5, 1.0, 1.2]
        bias = [0.0] * 8
        ids, w, scores = benchlib.reference_deepseek_route(logits, bias, 2, 4, 2, 2.5)
        self.assertEqual(sorted(ids), [4, 5])
        self.assertAlmostEqual(sum(w), 2.5)
        self.assertEqual(scores[0], 0.0)  # masked

    def test_deepseek_bias_chooses_but_does_not_weigh(self):
        logits = [0.0, 0.1, 0.0, 0.0]
        bias = [0.0, 0.0, 0.5, 0.0]
        ids, w, _ = benchlib.reference_deepseek_route(logits, bias, 1, 1, 1, 1.0, renormalize=False)
        self.assertEqual(ids, [2])
        self.assertAlmostEqual(w[0], 0.5)  # sigmoid(0), the bias is not in the weight

    def test_deepseek_masked_zero_can_win_like_transformers(self):
        # Kept-group experts with negative biased scores lose to the 0.0 of masked experts (transformers masks
        # with 0.0, not -inf); RouterConfig.swift documents the same rule.
        logits = [0.0, 0.0, -9.0, -9.0]
        bias = [1.0, 1.0, -0.5, -0.5]
        ids, _, _ = benchlib.reference_deepseek_route(logits, bias, 2, 2, 1, 1.0)
        self.assertEqual(sorted(ids), [0, 1])
        # 3 groups of 2, keep 2: group 1 (biased 1.5 each) and group 2 (-0.2 each) beat group 0 (-0.3 each); the
        # third slot then goes to masked expert 0 (0.0 > -0.2, lower index among the masked).
        bias = [-0.8, -0.8, 1.0, 1.0, -0.7, -0.7]
        ids, _, scores = benchlib.reference_deepseek_route([0.0] * 6, bias, 3, 3, 2, 1.0)
        self.assertEqual(ids, [2, 3, 0])
        self.assertEqual(scores[:2], [0.0, 0.0])

    def test_deepseek_validation(self):
        with self.assertRaises(ValueError):
            benchlib.reference_deepseek_route([0.0] * 6, [0.0] * 6, 1, 4, 1, 1.0)  # 6 experts in 4 groups
        with self.assertRaises(ValueError):
            benchlib.reference_deepseek_route([0.0] * 8, [0.0] * 8, 5, 4, 2, 1.0)  # k above kept experts

    def test_compare_routes(self):
        same, tie, err = benchlib.compare_routes([3, 1], [0.4, 0.6], [1, 3], [0.6, 0.4000001], [0, 0.6, 0, 0.4])
        self.assertTrue(same)
        self.assertAlmostEqual(err, 1e-7)
        same, tie, _ = benchlib.compare_routes([1, 2], [0.5, 0.5], [1, 3], [0.5, 0.5], [0, 0.5, 0.3, 0.3])
        self.assertFalse(same)
        self.assertTrue(tie)
        same, tie, _ = benchlib.compare_routes([1, 2], [0.5, 0.5], [1, 3], [0.5, 0.5], [0, 0.5, 0.1, 0.3])
        self.assertFalse(same or tie)


class CompareTests(unittest.TestCase):
    def write(self, data) -> str:
        f = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
        json.dump(data, f)
        f.close()
        self.addCleanup(os.unlink, f.name)
        return f.name

    def test_expert_parallel_entries_are_left_to_scaling(self):
        fm = self.write([
            {"preset": "paper-e64", "tokens": 8192, "precision": "bf16", "median_ms": 0.77},
            {"preset": "paper-e64", "tokens": 8192, "precision": "bf16", "median_ms": 1.01, "ranks": 8,
             "rank_devices": [0]}])
        warnings: list[str] = []
        entries = compare.index_flashmoe([fm], warnings.append)
        self.assertEqual(entries[("paper-e64", 8192, "bf16")]["median_ms"], 0.77)
        self.assertEqual(warnings, [])

    def test_torch_table(self):
        fm = self.write([{"preset": "paper-e64", "tokens": 8192, "precision": "bf16", "median_ms": 0.82,
                          "tflops": 300, "floor_ms": 0.40, "backend": "flashmoe"}])
        tr = self.write([
            {"preset": "paper-e64", "tokens": 8192, "impl": "loop", "precision": "bf16", "median_ms": 7.24,
             "floor_ms": 0.36},
            {"preset": "paper-e64", "tokens": 8192, "impl": "grouped", "precision": "bf16", "median_ms": 1.64,
             "floor_ms": 0.36},
            {"preset": "qwen3-30b-a3b", "tokens": 64, "impl": "grouped", "precision": "bf16", "median_ms": 0.87,
             "floor_ms": 0.28}])
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.assertEqual(compare.main(["--torch", tr, fm]), 0)
        lines = out.getvalue().strip().splitlines()
        self.assertTrue(lines[0].startswith("| preset | tokens | precision | FlashMoE ms"))
        self.assertEqual(lines[2], "| paper-e64 | 8192 | bf16 | 0.820 | 7.240 | 1.640 | 2.00× | 0.400 |")
        self.assertEqual(lines[3], "| qwen3-30b-a3b | 64 | bf16 | – | – | 0.870 | – | 0.280 |")

    def test_numpy_table_and_target(self):
        npj = self.write([{"case": "layer", "preset": "paper-e32", "tokens": 256, "median_ms": 100.0,
                           "gflops": 90.0},
                          {"case": "expert16", "median_ms": 35.0, "gflops": 120.0}])
        fast = self.write([{"preset": "paper-e32", "tokens": 256, "precision": "fp32", "median_ms": 200.0}])
        slow = self.write([{"preset": "paper-e32", "tokens": 256, "precision": "fp32", "median_ms": 400.0}])
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.assertEqual(compare.main(["--numpy", npj, fast]), 0)
            self.assertEqual(compare.main(["--numpy", npj, "--strict", slow]), 3)
        text = out.getvalue()
        self.assertIn("50% of numpy's speed on the same layer (target ≥ 40%): OK", text)
        self.assertIn("25% of numpy's speed on the same layer (target ≥ 40%): BELOW TARGET", text)
        flops = benchlib.layer_flops(benchlib.PRESETS["paper-e32"], 256)
        self.assertIn(f"| {flops / 0.2 / 1e9:.1f} |", text)  # GFLOP/s counted when the entry gives none

    def test_bad_inputs(self):
        notjson = self.write({"x": 1})
        with open(notjson, "w") as f:
            f.write("{nope")
        lacking = self.write([{"preset": "paper-e32", "tokens": 1}])
        for argv in (["--torch", notjson, lacking], ["--torch", "/nonexistent.json", lacking],
                     ["--torch", lacking, lacking]):
            err = io.StringIO()
            with self.subTest(argv=argv), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                self.assertEqual(compare.main(argv), 2)
                self.assertIn("error:", err.getvalue())


@unittest.skipIf(np is None, "numpy is not installed")
class NumpyTests(unittest.TestCase):
    def test_moe_layer_matches_per_token_reference(self):
        rng = np.random.default_rng(0)
        S, H, I, E, k = 7, 16, 12, 5, 2
        x = rng.standard_normal((S, H)).astype(np.float64)
        wg = rng.uniform(-0.5, 0.5, (E, H))
        w1 = rng.uniform(-0.3, 0.3, (E, I, H))
        w2 = rng.uniform(-0.3, 0.3, (E, H, I))
        got = numpy_matmul.moe_layer_numpy(x, wg, w1, w2, k)
        for t in range(S):
            ids, w, _ = benchlib.reference_softmax_topk(list(x[t] @ wg.T), k)
            want = sum(wj * (np.maximum(w1[e] @ x[t], 0) @ w2[e].T) for e, wj in zip(ids, w))
            np.testing.assert_allclose(got[t], want, rtol=1e-10, atol=1e-12)

    def test_run_case_reports_rates(self):
        r = numpy_matmul.run_case("expert256", np.random.default_rng(0), 0, 1)
        self.assertEqual((r["m"], r["k"], r["n"], r["flops"]), (256, 2048, 2048, 2 * 256 * 2048 * 2048))
        self.assertGreater(r["gflops"], 0)


if __name__ == "__main__":
    unittest.main()
