"""Tests of scripts/check_transformers.py's fp8 case that need no torch: the E4M3 and block-scale rules it writes
FP8 checkpoints by (FlashMoE's, docs/fp8.md), which tensors it stores in FP8, the quantization_config it writes and
its limits (all in scripts/transformers_fp8.py), and its command line (check_transformers.py). Where torch is
importable (the GPU host) the torch implementations are held to the same rules too.

    python3 -m unittest discover -s Benchmarks -p 'test_*.py'
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import os
import random
import subprocess
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = os.path.join(os.path.dirname(HERE), "scripts")
sys.path.insert(0, SCRIPTS)
import check_transformers as ct  # noqa: E402  (imports torch only inside its functions)
import transformers_fp8 as tf8  # noqa: E402  (the same)

HAVE_TORCH = importlib.util.find_spec("torch") is not None


def finite_values() -> list[float]:
    """Every finite non-negative E4M3 value, ascending."""
    return sorted({tf8.e4m3_value(c) for c in range(128) if not math.isnan(tf8.e4m3_value(c))})


class E4M3Tests(unittest.TestCase):
    def test_codes_decode_to_the_format(self):
        values = [tf8.e4m3_value(c) for c in range(256)]
        self.assertEqual([c for c, v in enumerate(values) if math.isnan(v)], [0x7F, 0xFF])
        self.assertEqual(max(v for v in values if not math.isnan(v)), 448.0)
        self.assertEqual(tf8.e4m3_value(0x7E), 448.0)
        self.assertEqual(tf8.e4m3_value(0x01), 2.0 ** -9)  # smallest subnormal
        self.assertEqual(tf8.e4m3_value(0x08), 2.0 ** -6)  # smallest normal
        self.assertEqual(tf8.e4m3_value(0x38), 1.0)
        self.assertEqual(tf8.e4m3_value(0xB8), -1.0)
        self.assertEqual(math.copysign(1, tf8.e4m3_value(0x80)), -1.0)
        self.assertEqual(len(finite_values()), 127)  # 0 and 126 positive values

    def test_rounding_is_to_nearest_even_and_saturates(self):
        vals = finite_values()
        for v in vals:
            self.assertEqual(tf8.e4m3_round(v), v)
            self.assertEqual(tf8.e4m3_round(-v), -v)
        for i, (a, b) in enumerate(zip(vals, vals[1:])):
            mid = (a + b) / 2  # exact: both have few bits
            even = a if i % 2 == 0 else b  # codes 0, 1, 2...: the even code is the lower one at even i
            self.assertEqual(tf8.e4m3_round(mid), even, (a, b))
            self.assertEqual(tf8.e4m3_round(math.nextafter(mid, 0)), a)
            self.assertEqual(tf8.e4m3_round(math.nextafter(mid, math.inf)), b)
        self.assertEqual(tf8.e4m3_round(2.0 ** -10), 0.0)  # the tie between 0 and 2^-9 goes to 0
        self.assertEqual(tf8.e4m3_round(3 * 2.0 ** -10), 2.0 ** -8)  # between 1 and 2 x 2^-9: to 2 (even)
        for big in (448.0, 460.0, 464.0, 470.0, 1e6, math.inf):
            self.assertEqual(tf8.e4m3_round(big), 448.0)
            self.assertEqual(tf8.e4m3_round(-big), -448.0)
        self.assertTrue(math.isnan(tf8.e4m3_round(math.nan)))
        self.assertEqual(math.copysign(1, tf8.e4m3_round(-1e-9)), -1.0)  # the sign of zero is kept

    def test_relative_error_is_at_most_a_sixteenth_in_the_normal_range(self):
        rng = random.Random(3)
        for _ in range(2000):
            v = tf8.f32(rng.uniform(2.0 ** -6, 448.0) * rng.choice((-1, 1)))
            self.assertLessEqual(abs(tf8.e4m3_round(v) - v), abs(v) / 16 + 1e-12)


class ScaleTests(unittest.TestCase):
    def test_scale_is_amax_over_448_in_float32_or_one(self):
        self.assertEqual(tf8.fp8_scale(448.0), 1.0)
        self.assertEqual(tf8.fp8_scale(0.0), 1.0)
        self.assertEqual(tf8.fp8_scale(1e-45), 1.0)  # the quotient underflows to 0
        self.assertEqual(tf8.fp8_scale(1.0), tf8.f32(1 / 448))
        self.assertEqual(tf8.fp8_scale(3.0), tf8.f32(3 / 448))
        self.assertNotEqual(tf8.fp8_scale(3.0), 3 / 448)  # float32, not float64

    def test_scale_shapes(self):
        self.assertEqual(tf8.fp8_scale_shape([384, 256]), [3, 2])
        self.assertEqual(tf8.fp8_scale_shape([256, 384]), [2, 3])
        self.assertEqual(tf8.fp8_scale_shape([8, 768, 256]), [8, 6, 2])
        self.assertEqual(tf8.fp8_scale_shape([24, 256]), [1, 2])  # DeepSeek's kv_a_proj_with_mqa: a short block
        self.assertEqual(tf8.fp8_scale_shape([129, 1]), [2, 1])
        with self.assertRaises(ValueError):
            tf8.fp8_scale_shape([256])

    def test_block_quantizer_gives_every_block_its_scale(self):
        rng = random.Random(7)
        factors = [[0.25, 3.0], [1.0, 0.0]]  # the last block all zeros
        m = [[tf8.f32(rng.uniform(-1, 1) * factors[r // 128][c // 128]) for c in range(200)] for r in range(130)]
        codes, scales = tf8.quantize_blocks_reference(m)
        self.assertEqual([len(scales), len(scales[0])], tf8.fp8_scale_shape([130, 200]))
        self.assertEqual(scales[1][1], 1.0)
        for bi in range(2):
            for bj in range(2):
                rows = range(bi * 128, min(130, bi * 128 + 128))
                cols = range(bj * 128, min(200, bj * 128 + 128))
                amax = max(abs(m[r][c]) for r in rows for c in cols)
                if amax == 0:
                    self.assertTrue(all(codes[r][c] == 0 for r in rows for c in cols))
                    continue
                self.assertEqual(scales[bi][bj], tf8.fp8_scale(amax))
                self.assertEqual(max(abs(codes[r][c]) for r in rows for c in cols), 448.0)  # amax -> +-448
                for r in rows:
                    for c in cols:
                        self.assertIn(abs(codes[r][c]), set(finite_values()))
                        self.assertLessEqual(abs(codes[r][c] * scales[bi][bj] - m[r][c]),
                                             abs(m[r][c]) / 16 + scales[bi][bj] * 2.0 ** -10)

    def test_activation_groups_of_128(self):
        rng = random.Random(11)
        row = [tf8.f32(rng.gauss(0, 1) * (100.0 if i >= 256 else 1.0)) for i in range(300)]
        q = tf8.fake_quantize_row_reference(row)
        self.assertEqual(len(q), 300)
        for start in (0, 128, 256):
            group = row[start:start + 128]
            s = tf8.fp8_scale(max(abs(v) for v in group))
            i = max(range(len(group)), key=lambda j: abs(group[j]))
            self.assertEqual(abs(q[start + i]), 448.0 * s)
            for v, w in zip(group, q[start:start + 128]):
                self.assertEqual(w / s, tf8.e4m3_round(tf8.f32(v / s)))


class CheckpointFormatTests(unittest.TestCase):
    def test_which_tensors_are_fp8(self):
        fp8 = ["model.layers.1.mlp.experts.3.gate_proj.weight", "model.layers.1.mlp.experts.0.down_proj.weight",
               "model.layers.1.mlp.shared_experts.up_proj.weight", "model.layers.0.mlp.gate_proj.weight",
               "model.layers.0.self_attn.kv_a_proj_with_mqa.weight", "model.layers.1.self_attn.o_proj.weight",
               "model.layers.1.block_sparse_moe.experts.2.w1.weight"]
        kept = ["model.layers.1.mlp.gate.weight", "model.layers.1.block_sparse_moe.gate.weight",
                "model.layers.1.mlp.shared_expert_gate.weight", "lm_head.weight", "model.embed_tokens.weight",
                "model.layers.1.mlp.gate.e_score_correction_bias", "model.layers.1.self_attn.q_norm.weight",
                "model.layers.0.self_attn.kv_a_layernorm.weight"]
        for name in fp8:
            self.assertTrue(tf8.fp8_quantized(name, 2), name)
            self.assertFalse(tf8.fp8_quantized(name, 3), name)  # fused stacks are split first
        for name in kept:
            self.assertFalse(tf8.fp8_quantized(name, 2 if "norm" not in name and "bias" not in name else 1), name)
            self.assertFalse(tf8.fp8_quantized(name, 2), name)

    def test_quantization_config_is_the_hubs(self):
        ds = tf8.fp8_quantization_config("deepseek_v3", [1])
        self.assertEqual(ds, {"activation_scheme": "dynamic", "quant_method": "fp8", "fmt": "e4m3",
                              "weight_block_size": [128, 128]})
        qw = tf8.fp8_quantization_config("qwen3_moe", [1, 3])
        self.assertNotIn("fmt", qw)  # Qwen3's FP8 releases omit it; FlashMoE takes e4m3 then
        self.assertEqual(qw["modules_to_not_convert"],
                         ["lm_head", "model.layers.1.mlp.gate", "model.layers.3.mlp.gate"])
        self.assertEqual(qw["weight_block_size"], [128, 128])  # the only block size FlashMoE accepts

    def test_fp8_sizes_fit_both_loaders(self):
        tf8.check_fp8_sizes(tf8.FP8_SIZES)
        self.assertNotEqual(tf8.FP8_SIZES["hidden"], tf8.FP8_SIZES["inter"])  # non-square scale grids
        for key in ("hidden", "inter", "shared"):
            self.assertEqual(tf8.FP8_SIZES[key] % 16, 0)  # FlashMoE's GPU fp8 path
            with self.assertRaises(ValueError):
                tf8.check_fp8_sizes(dict(tf8.FP8_SIZES, **{key: 192}))

    def test_limits(self):
        loose, tight = 0.08, 1e-5
        self.assertEqual(tf8.fp8_limit("emulated", "cpu", loose, tight), 5e-3)
        self.assertEqual(tf8.fp8_limit("emulated", "oracle", loose, tight), 5e-3)
        self.assertEqual(tf8.fp8_limit("emulated", "cuda", loose, tight), 5e-2)
        self.assertEqual(tf8.fp8_limit("emulated", "auto", loose, tight), 5e-2)
        self.assertEqual(tf8.fp8_limit("cuda-vs-cpu", None, loose, tight), 5e-2)
        self.assertEqual(tf8.fp8_limit("transformers-emulated", None, loose, tight), 5e-2)
        self.assertEqual(tf8.fp8_limit("dequantized", "cpu", loose, tight), loose)
        self.assertEqual(tf8.fp8_limit("transformers", "cuda", loose, tight), loose)
        self.assertEqual(tf8.fp8_limit("transformers-dequantized", None, loose, tight), tight)
        with self.assertRaises(ValueError):
            tf8.fp8_limit("bogus", None, loose, tight)


class ArgsTests(unittest.TestCase):
    def test_default_is_fp32_only(self):
        a = ct.parse_args(["bin/flashmoe"])
        self.assertEqual(a.precisions, ["fp32"])
        self.assertEqual(a.fp8_families, [])
        self.assertEqual(a.backends, ["cpu"])

    def test_fp8_selection(self):
        a = ct.parse_args(["b", "--fp8", "--backends", "cpu,cuda"])
        self.assertEqual(a.precisions, ["fp8"])
        self.assertEqual(a.fp8_families, ["qwen3_moe", "deepseek_v3"])
        self.assertEqual(a.fp8_tolerance, 0.08)
        b = ct.parse_args(["b", "--precisions", "fp32,fp8", "--families", "mixtral,deepseek_v3"])
        self.assertEqual(b.precisions, ["fp32", "fp8"])
        self.assertEqual(b.fp8_families, ["deepseek_v3"])
        self.assertEqual(ct.parse_args(["b", "--fp8", "--precisions", "fp8"]).precisions, ["fp8"])
        for argv in (["b", "--fp8", "--precisions", "fp32"], ["b", "--precisions", "fp8", "--families", "mixtral"],
                     ["b", "--precisions", "fp16"], ["b", "--precisions", ","]):
            with self.subTest(argv=argv), contextlib.redirect_stderr(io.StringIO()):
                with self.assertRaises(SystemExit):
                    ct.parse_args(argv)

    def test_importing_the_script_needs_no_torch(self):
        code = ("import sys; sys.path.insert(0, sys.argv[1]); import check_transformers; "
                "print('torch' in sys.modules)")
        out = subprocess.run([sys.executable, "-c", code, SCRIPTS], capture_output=True, text=True, timeout=60)
        self.assertEqual(out.stdout.strip(), "False", out.stderr)


@unittest.skipUnless(HAVE_TORCH, "needs torch (the GPU host has it)")
class TorchRulesTests(unittest.TestCase):
    def test_torch_follows_the_rules(self):
        self.assertIsNone(tf8.check_torch_fp8_rules())

    def test_block_quantizer_round_trip(self):
        import torch

        w = torch.randn(2, 384, 256, generator=torch.Generator().manual_seed(1))
        codes, scale = tf8.quantize_fp8_blocks(w)
        self.assertEqual(codes.dtype, torch.float8_e4m3fn)
        self.assertEqual(list(scale.shape), tf8.fp8_scale_shape(w.shape))
        deq = tf8.dequantize_fp8_blocks(codes, scale)
        self.assertLess(float((deq - w.double()).abs().max() / w.abs().max()), 1 / 16)
        split = tf8.split_fused_experts({"m.experts.gate_up_proj": w.reshape(2, 384, 256)[:, :384].repeat(1, 2, 1),
                                        "m.experts.down_proj": w.transpose(1, 2).contiguous()})
        self.assertEqual(sorted(split), ["m.experts.0.down_proj.weight", "m.experts.0.gate_proj.weight",
                                         "m.experts.0.up_proj.weight", "m.experts.1.down_proj.weight",
                                         "m.experts.1.gate_proj.weight", "m.experts.1.up_proj.weight"])
        self.assertEqual(list(split["m.experts.1.gate_proj.weight"].shape), [384, 256])


if __name__ == "__main__":
    unittest.main()
