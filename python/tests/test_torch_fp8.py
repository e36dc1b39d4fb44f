"""precision "fp8" through torch on the CPU backend: `flashmoe.MoELayer` with torch.float8_e4m3fn experts and their
block scales, and `MoELayer.from_hf_block` / `flashmoe.patch` on FP8 transformers blocks (fused float8 experts with
`gate_up_proj_scale_inv` / `down_proj_scale_inv`, and FP8 linears with `weight_scale_inv` in the shared expert).

The FP8 blocks here are tiny DeepSeek-V3 blocks whose bf16 experts are replaced by their codes and scales, computed
with the library's rule (reference.quantize_blocks): a layer from them must give the bf16 block's fp8 layer's y bit
for bit. Skipped, with the reason, without torch or transformers (they run on the GPU host's torch).
"""

from __future__ import annotations

import sys
import unittest
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent / "scripts"))

try:
    import torch
except ImportError as e:  # pragma: no cover - depends on the machine
    torch = None
    TORCH_MISSING = f"torch is not importable ({e}); install a CPU torch to run these tests"
else:
    TORCH_MISSING = ""
try:
    import transformers  # noqa: F401
except ImportError as e:  # pragma: no cover
    TRANSFORMERS_MISSING = f"transformers is not importable ({e})"
else:
    TRANSFORMERS_MISSING = ""

import flashmoe  # noqa: E402
from hf_models import codes_and_scales, make_fp8_experts  # noqa: E402


def dequantized(codes, scales) -> "torch.Tensor":
    r, c = codes.shape[-2:]
    s = scales.repeat_interleave(128, -2)[..., :r, :].repeat_interleave(128, -1)[..., :c]
    return (codes.float() * s).to(torch.bfloat16)


@unittest.skipIf(torch is None, TORCH_MISSING)
class TorchFP8LayerTest(unittest.TestCase):
    def test_float8_experts_equal_bf16_experts(self):
        g = torch.Generator().manual_seed(4)
        h, i, e = 192, 128, 4
        u = lambda *s: ((torch.rand(s, generator=g) * 2 - 1) / s[-1] ** 0.5).to(torch.bfloat16)  # noqa: E731
        router, gate_up, down = u(e, h), u(e, 2 * i, h), u(e, h, i)
        cfg = flashmoe.MoEConfig(hidden=h, intermediate=i, experts=e, top_k=2, max_tokens=32)
        bf16 = flashmoe.MoELayer(cfg.replace(precision="fp8"), {"router": router, "gate_up": gate_up, "down": down})
        (gu, gus), (d, ds) = codes_and_scales(gate_up), codes_and_scales(down)
        fp8 = flashmoe.MoELayer(cfg, {"router": router, "gate_up": gu, "gate_up_scale": gus, "down": d,
                                      "down_scale": ds})
        self.assertEqual(fp8.native.precision, "fp8")  # float8 experts imply it
        x = u(29, h)
        self.assertTrue(torch.equal(fp8(x), bf16(x)))
        with self.assertRaisesRegex(ValueError, "down_scale"):
            flashmoe.MoELayer(cfg, {"router": router, "gate_up": gu, "gate_up_scale": gus, "down": d})
        with self.assertRaisesRegex(TypeError, r"weights\['gate_up_scale'\] must have dtype float32"):
            flashmoe.MoELayer(cfg, {"router": router, "gate_up": gu, "gate_up_scale": gus.double(), "down": d,
                                    "down_scale": ds})


@unittest.skipIf(torch is None, TORCH_MISSING)
@unittest.skipIf(TRANSFORMERS_MISSING, TRANSFORMERS_MISSING)
class HFFP8BlockTest(unittest.TestCase):
    """A DeepSeek-V3 block made FP8 the way transformers' fine-grained FP8 holds one."""

    def block(self):
        from check_transformers import moe_block
        from hf_models import tiny_model

        model = tiny_model("deepseek_v3", seed=3, dtype=torch.bfloat16, inter=128)
        return model, moe_block(model)

    def test_fused_fp8_experts(self):
        model, block = self.block()
        self.assertTrue(hasattr(block.experts, "gate_up_proj"), "transformers 5 holds the experts fused")
        x = torch.randn(23, model.config.hidden_size, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
        want = flashmoe.MoELayer.from_hf_block(block, model.config, precision="fp8")(x)
        make_fp8_experts(block)
        layer = flashmoe.MoELayer.from_hf_block(block, model.config)
        self.assertEqual(layer.config.precision, "fp8")
        self.assertTrue(torch.equal(layer(x), want), "FP8 experts differ from the same bf16 experts quantized")
        block.experts.block_size = (64, 64)
        with self.assertRaisesRegex(ValueError, r"block\.experts\.block_size is \(64, 64\)"):
            flashmoe.MoELayer.from_hf_block(block, model.config)
        del block.experts.block_size
        del block.experts.down_proj_scale_inv
        with self.assertRaisesRegex(ValueError, "only one of gate_up_proj_scale_inv and down_proj_scale_inv"):
            flashmoe.MoELayer.from_hf_block(block, model.config)

    def test_fp8_shared_expert_is_dequantized(self):
        model, block = self.block()
        shared = block.shared_experts
        x = torch.randn(17, model.config.hidden_size, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
        # The shared linears as FP8 linears; the reference block gets their dequantized values as bf16 weights.
        for name in ("gate_proj", "up_proj", "down_proj"):
            linear = getattr(shared, name)
            codes, scales = codes_and_scales(linear.weight.detach())
            linear.weight.data = dequantized(codes, scales)
        want = flashmoe.MoELayer.from_hf_block(block, model.config, precision="fp8")(x)
        for name in ("gate_proj", "up_proj", "down_proj"):
            linear = getattr(shared, name)
            codes, scales = codes_and_scales(linear.weight.detach())
            linear.weight = torch.nn.Parameter(codes, requires_grad=False)
            linear.weight_scale_inv = torch.nn.Parameter(scales, requires_grad=False)
        make_fp8_experts(block)
        y = flashmoe.MoELayer.from_hf_block(block, model.config)(x)
        self.assertTrue(torch.equal(y, want))

    def test_patch_takes_fp8_blocks(self):
        model, block = self.block()
        make_fp8_experts(block)
        patched = flashmoe.patch(model)
        self.assertEqual(len(patched), 1)
        ids = torch.randint(0, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            logits = model(ids).logits
        self.assertTrue(torch.isfinite(logits).all())


@unittest.skipIf(torch is None, TORCH_MISSING)
class PerExpertFP8Test(unittest.TestCase):
    def test_transformers4_style_fp8_linears(self):
        from test_torch_cpu import _Mixtral4Block

        block = _Mixtral4Block(hidden=256, inter=128, experts=4, top_k=2).to(torch.bfloat16)
        cfg = block.config
        x = torch.randn(19, 256, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
        want = flashmoe.MoELayer.from_hf_block(block, cfg, precision="fp8")(x)
        for expert in block.experts:
            for name in ("w1", "w3", "w2"):
                linear = getattr(expert, name)
                codes, scales = codes_and_scales(linear.weight.detach())
                linear.weight = torch.nn.Parameter(codes, requires_grad=False)
                linear.weight_scale_inv = torch.nn.Parameter(scales, requires_grad=False)
        layer = flashmoe.MoELayer.from_hf_block(block, cfg)
        self.assertEqual(layer.config.precision, "fp8")
        self.assertTrue(torch.equal(layer(x), want))
        # An in-place edit of one expert's scales is seen on the next call (the layer tracks the scale parameters).
        with torch.no_grad():
            for expert in block.experts:
                expert.w2.weight_scale_inv.mul_(2)
        fresh = flashmoe.MoELayer.from_hf_block(block, cfg)(x)
        self.assertFalse(torch.equal(fresh, want))
        self.assertTrue(torch.equal(layer(x), fresh))


if __name__ == "__main__":
    unittest.main()
