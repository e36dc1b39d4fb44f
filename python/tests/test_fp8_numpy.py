"""precision "fp8" through the numpy front end (CPU backend): the routed experts as bfloat16 bits (quantized at
creation) or as E4M3 codes with block scales, in both layouts, and the scales' argument errors.

The codes and scales are computed here with the library's rule (reference.quantize_blocks), so every way of
passing one layer must give the same y, bit for bit; each 128×128 block has its own magnitude (up to 2^7 apart),
so a scale taken from the wrong block, matrix or expert shows. Needs lib/libflashmoe.so and numpy.
"""

from __future__ import annotations

import sys
import unittest
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import flashmoe  # noqa: E402
from flashmoe.config import MoEConfig  # noqa: E402
from reference import blocky, moe_reference, quantize_blocks, relative_error, to_bf16_bits  # noqa: E402


class FP8LayerTest(unittest.TestCase):
    def layer_case(self, hidden, inter, seed):
        rng = np.random.default_rng(seed)
        cfg = MoEConfig(hidden=hidden, intermediate=inter, experts=4, top_k=2, shared_intermediate=64,
                        max_tokens=64, precision="fp8")
        h, i, e = hidden, inter, 4
        f = {"router": blocky(rng, (e, h), h), "gate": blocky(rng, (e, i, h), h), "up": blocky(rng, (e, i, h), h),
             "down": blocky(rng, (e, h, i), i), "shared_gate_up": blocky(rng, (64, h), h),
             "shared_up": blocky(rng, (64, h), h), "shared_down": blocky(rng, (h, 64), 64)}
        x = blocky(rng, (31, h), 1)
        return cfg, f, x

    def bits(self, f, names):
        return {n: to_bf16_bits(f[n]) for n in names}

    def check_layer(self, hidden, inter, seed):
        cfg, f, x = self.layer_case(hidden, inter, seed)
        xb = to_bf16_bits(x)
        shared = self.bits(f, ("router", "shared_gate_up", "shared_up", "shared_down"))
        q = {n: quantize_blocks(f[n]) for n in ("gate", "up", "down")}
        ys = {}
        with flashmoe.Layer(cfg, {**shared, **self.bits(f, ("gate", "up", "down"))}) as layer:
            self.assertEqual(layer.precision, "fp8")
            ys["bf16 experts"] = layer.forward(xb)[0]
        codes = {"gate": q["gate"][0], "up": q["up"][0], "down": q["down"][0], "gate_scale": q["gate"][1],
                 "up_scale": q["up"][1], "down_scale": q["down"][1]}
        with flashmoe.Layer(cfg, {**shared, **codes}) as layer:
            ys["E4M3 separate"] = layer.forward(xb)[0]
        if inter % 128 == 0:
            fused_codes, fused_scales, _ = quantize_blocks(np.concatenate([f["gate"], f["up"]], axis=1))
            fused = {"router": shared["router"], "down": codes["down"], "down_scale": codes["down_scale"],
                     "gate_up": fused_codes, "gate_up_scale": fused_scales,
                     "shared_gate_up": to_bf16_bits(np.concatenate([f["shared_gate_up"], f["shared_up"]])),
                     "shared_down": shared["shared_down"]}
            with flashmoe.Layer(cfg, fused) as layer:
                ys["E4M3 fused"] = layer.forward(xb)[0]
        first = ys["bf16 experts"]
        self.assertTrue(np.isfinite(first).all())
        for name, y in ys.items():
            np.testing.assert_array_equal(y, first, err_msg=f"{name} differs from bf16 experts")
        # Against float64 on the dequantized weights: the activations' E4M3 rounding costs a few percent.
        deq = {**f, "gate": q["gate"][2], "up": q["up"][2], "down": q["down"][2]}
        ref = moe_reference(cfg.replace(precision="fp32"), deq, x)[0]
        self.assertLess(relative_error(first, ref), 0.08)

    def test_three_ways_to_one_layer(self):
        self.check_layer(256, 128, 1)

    def test_partial_blocks_separate_layout(self):
        self.check_layer(160, 96, 2)


class FP8ErrorTest(unittest.TestCase):
    def setUp(self):
        rng = np.random.default_rng(3)
        self.cfg = MoEConfig(hidden=256, intermediate=128, experts=4, top_k=2, max_tokens=8, precision="fp8")
        gate_up = blocky(rng, (4, 256, 256), 256)
        down = blocky(rng, (4, 256, 128), 128)
        gu, gus, _ = quantize_blocks(gate_up)
        d, ds, _ = quantize_blocks(down)
        self.ok = {"router": to_bf16_bits(blocky(rng, (4, 256), 256)), "gate_up": gu, "gate_up_scale": gus,
                   "down": d, "down_scale": ds}

    def test_valid(self):
        with flashmoe.Layer(self.cfg, self.ok) as layer:
            y = layer.forward(np.zeros((2, 256), np.uint16))[0]
        self.assertEqual(y.shape, (2, 256))

    def test_scale_errors_name_the_weight(self):
        w = dict(self.ok)
        del w["down_scale"]
        with self.assertRaisesRegex(ValueError, "down_scale"):
            flashmoe.Layer(self.cfg, w)
        w = {**self.ok, "down_scale": self.ok["down_scale"][:, :1]}
        with self.assertRaisesRegex(ValueError, r"weights\['down_scale'\] must have shape \[4, 2, 1\]"):
            flashmoe.Layer(self.cfg, w)
        w = {**self.ok, "gate_scale": self.ok["gate_up_scale"]}
        with self.assertRaisesRegex(ValueError, "gate_scale"):
            flashmoe.Layer(self.cfg, w)
        w = {**self.ok, "gate_up_scale": self.ok["gate_up_scale"].astype(np.float64)}
        with self.assertRaisesRegex(TypeError, r"weights\['gate_up_scale'\] must have dtype float32"):
            flashmoe.Layer(self.cfg, w)
        with self.assertRaisesRegex(ValueError, "gate_up_scale.*precision 'fp8'"):
            flashmoe.Layer(self.cfg.replace(precision="bf16"), self.ok)

    def test_codes_without_scales(self):
        w = {k: v for k, v in self.ok.items() if not k.endswith("_scale")}
        with self.assertRaisesRegex(TypeError, "holds float8_e4m3fn codes but no block scales"):
            flashmoe.Layer(self.cfg, w)

    def test_fused_codes_need_i_multiple_of_128(self):
        cfg = self.cfg.replace(intermediate=96)
        w = {"router": self.ok["router"], "gate_up": np.zeros((4, 192, 256), np.uint8),
             "gate_up_scale": np.ones((4, 2, 2), np.float32), "down": np.zeros((4, 256, 96), np.uint8),
             "down_scale": np.ones((4, 2, 1), np.float32)}
        with self.assertRaisesRegex(ValueError, "gate_up_scale.*multiple of 128"):
            flashmoe.Layer(cfg, w)

    def test_non_finite_scale_refused_by_the_library(self):
        for bad in (np.nan, np.inf):
            scales = self.ok["down_scale"].copy()
            scales[2, 1, 0] = bad
            with self.assertRaises(flashmoe.FlashMoEError) as caught:
                flashmoe.Layer(self.cfg, {**self.ok, "down_scale": scales})
            self.assertIn("down_scale", caught.exception.message)
            self.assertIn("finite", caught.exception.message)


if __name__ == "__main__":
    unittest.main()
