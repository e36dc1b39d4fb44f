"""The torch front end on the CPU backend: MoELayer, the flashmoe::moe_forward op (opcheck, torch.compile tracing),
weight tracking, argument errors, and flashmoe.patch on tiny transformers models of each family.

Skipped, with the reason, when torch (or, for the patch tests, transformers) is not importable; the GPU side of the
same checks is scripts/gpu-python.

    PYTHONPATH=python:/path/to/cpu-torch python3 -m unittest discover -s python/tests -v
"""

from __future__ import annotations

import logging
import sys
import unittest
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "scripts"))

from reference import moe_reference, random_weights, relative_error  # noqa: E402

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
from flashmoe.config import MoEConfig  # noqa: E402

if torch is not None:
    # the ops' Python kernels, called directly: arguments the dispatcher's schema check would refuse first
    from flashmoe.torch_op import _moe_forward_kernel as _op_kernel  # noqa: E402
    from flashmoe.torch_op import _moe_forward_out_kernel as _op_out_kernel  # noqa: E402

FP32_TOL = 1e-5


def small_config(**changes) -> MoEConfig:
    return MoEConfig(hidden=32, intermediate=16, experts=8, top_k=2, max_tokens=64).replace(**changes)


def torch_weights(cfg, seed=0, **options):
    rng = np.random.default_rng(seed)
    w = random_weights(cfg, rng, **options)
    return w, {k: torch.from_numpy(v.copy()) for k, v in w.items()}


@unittest.skipIf(torch is None, TORCH_MISSING)
class MoELayerTest(unittest.TestCase):
    def setUp(self):
        self.cfg = small_config(shared_intermediate=24, shared_gated=True, renormalize=False)
        self.np_w, self.w = torch_weights(self.cfg, seed=1)
        self.layer = flashmoe.MoELayer(self.cfg, self.w)
        self.x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(2))

    def tearDown(self):
        self.layer.close()

    def reference(self, x, weights=None):
        return moe_reference(self.cfg, weights or self.np_w, x.reshape(-1, 32).numpy())

    def test_forward_matches_reference(self):
        y, ids, w = self.layer(self.x, return_routing=True)
        self.assertEqual(y.shape, self.x.shape)
        self.assertEqual((ids.dtype, w.dtype, y.dtype), (torch.int32, torch.float32, torch.float32))
        ref_y, ref_ids, ref_w = self.reference(self.x)
        self.assertLess(relative_error(y.reshape(-1, 32).numpy(), ref_y), FP32_TOL)
        np.testing.assert_array_equal(ids.numpy(), ref_ids)
        np.testing.assert_allclose(w.numpy(), ref_w, rtol=1e-5, atol=1e-6)
        self.assertEqual(self.layer.device, torch.device("cpu"))
        self.assertIn("H=32", repr(self.layer))

    def test_op_returns_fresh_tensors_and_passes_opcheck(self):
        x = self.x.reshape(-1, 32)
        a = torch.ops.flashmoe.moe_forward(x, self.layer.layer_id)
        b = torch.ops.flashmoe.moe_forward(x, self.layer.layer_id)
        for s, t in zip(a, b):
            self.assertNotEqual(s.data_ptr(), t.data_ptr())
            self.assertTrue(torch.equal(s, t))
        torch.library.opcheck(torch.ops.flashmoe.moe_forward.default, (x, self.layer.layer_id))

    def test_y_only_op_matches_and_passes_opcheck(self):
        x = self.x.reshape(-1, 32)
        y, _, _ = torch.ops.flashmoe.moe_forward(x, self.layer.layer_id)
        y_only = torch.ops.flashmoe.moe_forward_y(x, self.layer.layer_id)
        self.assertEqual((y_only.shape, y_only.dtype), (y.shape, y.dtype))
        self.assertTrue(torch.equal(y_only, y))
        self.assertTrue(torch.equal(self.layer(self.x), y.view(self.x.shape)))  # the module's y-only path
        torch.library.opcheck(torch.ops.flashmoe.moe_forward_y.default, (x, self.layer.layer_id))
        empty = torch.ops.flashmoe.moe_forward_y(x[:0], self.layer.layer_id)
        self.assertEqual(empty.shape, (0, 32))

    def test_out_variant(self):
        x = self.x.reshape(-1, 32)
        y, ids, w = torch.ops.flashmoe.moe_forward(x, self.layer.layer_id)
        outs = (torch.full_like(y, float("nan")), torch.full_like(ids, -1), torch.full_like(w, float("nan")))
        torch.ops.flashmoe.moe_forward_out(x, self.layer.layer_id, *outs)
        for a, b in zip(outs, (y, ids, w)):
            self.assertTrue(torch.equal(a, b))
        torch.library.opcheck(torch.ops.flashmoe.moe_forward_out.default, (x, self.layer.layer_id, *outs))
        with self.assertRaises(TypeError) as ctx:
            torch.ops.flashmoe.moe_forward_out(x, self.layer.layer_id, outs[0].double(), outs[1], outs[2])
        self.assertIn("y", str(ctx.exception))
        with self.assertRaises(ValueError) as ctx:
            torch.ops.flashmoe.moe_forward_out(x, self.layer.layer_id, outs[0], outs[1][:, :1], outs[2])
        self.assertIn("topk_ids", str(ctx.exception))
        # each rule of check_array, for each output, with the output's name in the message
        buf = torch.empty(y.numel() + 1)
        bad = {
            "dtype": (TypeError, ["topk_weights", "float32", "float64"], (outs[0], outs[1], outs[2].double())),
            "device": (ValueError, ["y", "cpu", "meta"], (outs[0].to("meta"), outs[1], outs[2])),
            "contiguous": (ValueError, ["topk_weights", "contiguous"],
                           (outs[0], outs[1], outs[2].t().contiguous().t())),
            "aligned": (ValueError, ["y", "aligned"], (buf[1:].view(y.shape), outs[1], outs[2])),
            "shape": (ValueError, ["y", "shape"], (outs[0][:-1], outs[1], outs[2])),
        }
        for rule, (exc, words, args) in bad.items():
            with self.subTest(rule=rule):
                with self.assertRaises(exc) as ctx:
                    torch.ops.flashmoe.moe_forward_out(x, self.layer.layer_id, *args)
                for word in words:
                    self.assertIn(word, str(ctx.exception))
        with self.assertRaises(TypeError) as ctx:
            _op_out_kernel(x, self.layer.layer_id, outs[0], outs[1].numpy(), outs[2])
        self.assertIn("topk_ids", str(ctx.exception))
        with self.assertRaises(ValueError) as ctx:  # the kernel's own device check (the dispatcher picks Meta above)
            _op_out_kernel(x, self.layer.layer_id, outs[0], outs[1], outs[2].to("meta"))
        self.assertIn("topk_weights", str(ctx.exception))

        def f(x, y, ids, w):
            torch.ops.flashmoe.moe_forward_out(x, self.layer.layer_id, y, ids, w)
            return y * 2

        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        got = compiled(x, torch.empty_like(y), torch.empty_like(ids), torch.empty_like(w))
        self.assertTrue(torch.equal(got, y * 2))

    def test_torch_compile_fullgraph_traces_the_op(self):
        layer = self.layer

        def f(x):
            return layer(x * 2.0) + 1.0

        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        for tokens in (4, 9):
            x = torch.randn(tokens, 32)
            torch.testing.assert_close(compiled(x), f(x), rtol=0, atol=0)

    def test_weights_changed_in_place_are_picked_up(self):
        before = self.layer(self.x)
        with torch.no_grad():
            self.layer.down.mul_(2.0)
        after = self.layer(self.x)
        changed = dict(self.np_w, down=self.np_w["down"] * 2.0)
        self.assertLess(relative_error(after.reshape(-1, 32).numpy(), self.reference(self.x, changed)[0]), FP32_TOL)
        self.assertFalse(torch.allclose(before, after))

    def test_load_state_dict_rebuilds(self):
        other_np, other = torch_weights(self.cfg, seed=7)
        self.layer.load_state_dict(other)
        y = self.layer(self.x)
        self.assertLess(relative_error(y.reshape(-1, 32).numpy(), self.reference(self.x, other_np)[0]), FP32_TOL)
        self.assertEqual(sorted(self.layer.state_dict()), sorted(self.w))

    def test_half_precision_rebuild(self):
        self.layer.half()
        self.assertEqual(self.layer.storage_dtype, torch.float16)
        self.assertEqual(self.layer.output_dtype, torch.float32)  # the CPU backend writes float32
        y = self.layer(self.x.half())
        self.assertLess(relative_error(y.reshape(-1, 32).numpy(), self.reference(self.x)[0]), 1e-2)

    def test_argument_errors(self):
        layer, x = self.layer, self.x

        def raises(exc, words, fn, *args, **kwargs):
            with self.assertRaises(exc) as ctx:
                fn(*args, **kwargs)
            for word in words:
                self.assertIn(word, str(ctx.exception))

        raises(TypeError, ["x", "torch.Tensor"], layer, x.numpy())
        raises(TypeError, ["x", "float32", "float64"], layer, x.double())
        raises(ValueError, ["x", "32"], layer, x[..., :16].contiguous())
        raises(ValueError, ["x", "contiguous"], layer, x.transpose(0, 1))
        buf = torch.zeros(6 * 32 + 1)
        raises(ValueError, ["x", "aligned"], layer, buf[1:].view(6, 32))
        raises(ValueError, ["x", "max_tokens", "64"], layer, torch.zeros(65, 32))
        raises(ValueError, ["x", "cpu", "meta"], layer, torch.zeros(4, 32, device="meta"))
        raises(ValueError, ["stream", "CPU"], layer, x, stream=object())
        raises(ValueError, ["layer", "id"], torch.ops.flashmoe.moe_forward, x.reshape(-1, 32), 10**9)
        # the op itself checks as strictly as the module
        raises(TypeError, ["x", "float32"], torch.ops.flashmoe.moe_forward, x.reshape(-1, 32).double(),
               layer.layer_id)
        raises(ValueError, ["x", "aligned"], torch.ops.flashmoe.moe_forward, buf[1:].view(6, 32), layer.layer_id)
        raises(TypeError, ["x", "float32"], torch.ops.flashmoe.moe_forward_y, x.reshape(-1, 32).double(),
               layer.layer_id)
        raises(ValueError, ["x", "max_tokens"], torch.ops.flashmoe.moe_forward_y, torch.zeros(65, 32),
               layer.layer_id)
        raises(ValueError, ["layer", "id"], torch.ops.flashmoe.moe_forward_y, x.reshape(-1, 32), 10**9)
        raises(TypeError, ["x", "torch.Tensor"], _op_kernel, x.numpy(), layer.layer_id)
        # creation
        raises(ValueError, ["exactly one"], flashmoe.MoELayer, self.cfg)
        raises(ValueError, ["weights", "unknown", "w13"], flashmoe.MoELayer, self.cfg, dict(self.w, w13=self.w["down"]))
        raises(TypeError, ["weights['down']", "torch.Tensor"], flashmoe.MoELayer, self.cfg,
               dict(self.w, down=self.np_w["down"]))
        raises(ValueError, ["weights", "meta"], flashmoe.MoELayer, self.cfg,
               {k: v.to("meta") for k, v in self.w.items()})
        raises(ValueError, ["weights['down']", "shape"], flashmoe.MoELayer, self.cfg,
               dict(self.w, down=self.w["down"][:, :, :8].contiguous()))
        raises(ValueError, ["weights['gate_up']", "contiguous"], flashmoe.MoELayer, self.cfg,
               dict(self.w, gate_up=self.w["gate_up"].transpose(1, 2).contiguous().transpose(1, 2)))

    def test_close(self):
        layer = flashmoe.MoELayer(self.cfg, self.w)
        layer.close()
        layer.close()
        with self.assertRaises(ValueError):
            layer(self.x)

    def test_native_closed_behind_the_op(self):
        layer = flashmoe.MoELayer(self.cfg, self.w)
        x = self.x.reshape(-1, 32)
        layer.native.close()  # the id stays bound: the op must still refuse the closed handle
        for call in (lambda: torch.ops.flashmoe.moe_forward(x, layer.layer_id),
                     lambda: torch.ops.flashmoe.moe_forward_y(x, layer.layer_id)):
            with self.assertRaises(ValueError) as ctx:
                call()
            self.assertIn("closed", str(ctx.exception))
        layer.close()


@unittest.skipIf(torch is None, TORCH_MISSING)
@unittest.skipIf(bool(TRANSFORMERS_MISSING), TRANSFORMERS_MISSING)
class PatchTest(unittest.TestCase):
    """flashmoe.patch on tiny float32 models (scripts/check_transformers.py's configs), CPU backend."""

    def build(self, family, seed=0):
        from hf_models import tiny_model

        return tiny_model(family, seed=seed)

    def test_each_family_logits_generate_and_state_dict(self):
        from hf_models import FAMILIES

        for i, family in enumerate(FAMILIES):
            with self.subTest(family=family):
                model = self.build(family, seed=100 + i)
                ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(i))
                keys = {k: v.clone() for k, v in model.state_dict().items()}
                with torch.no_grad():
                    expected = model(ids).logits
                    names = flashmoe.patch(model)
                    self.assertGreaterEqual(len(names), 1)
                    self.assertTrue(all(isinstance(model.get_submodule(n), flashmoe.FlashMoEBlock) for n in names))
                    got = model(ids).logits
                self.assertLess(relative_error(got.numpy(), expected.numpy()), FP32_TOL)
                state = model.state_dict()
                self.assertEqual(sorted(state), sorted(keys))
                for k, v in keys.items():
                    self.assertTrue(torch.equal(state[k], v), k)
                # the checkpoint loads into the patched model, and the new values are used
                model.load_state_dict(keys)
                out = model.generate(ids[:1], max_new_tokens=8, do_sample=False)
                restored = flashmoe.unpatch(model)
                self.assertEqual(restored, names)
                ref = model.generate(ids[:1], max_new_tokens=8, do_sample=False)
                self.assertTrue(torch.equal(out, ref))

    def test_a_moved_router_buffer_is_read_anew(self):
        # .to()/.cuda() give every buffer a new tensor (parameters keep their objects): the layer must read the gate's
        # selection bias from the gate, not keep the tensor it first saw (after a device move that one sits on the
        # old device: "weights must all be on one device", as on the GPU before).
        from check_transformers import moe_block, run_block

        model = self.build("deepseek_v3", seed=12)
        original = moe_block(model)
        flashmoe.patch(model)
        patched = moe_block(model)
        x = torch.randn(13, model.config.hidden_size, generator=torch.Generator().manual_seed(12))
        bias = original.gate.e_score_correction_bias
        model._apply(lambda t: t.clone())  # what a device move does, on the CPU
        self.assertIsNot(patched.gate.e_score_correction_bias, bias)
        with torch.no_grad():
            favoured = torch.zeros_like(bias)
            favoured[-model.config.num_experts_per_tok:] = 10.0  # routes every token to the last experts
            patched.gate.e_score_correction_bias.copy_(favoured)  # an in-place edit of the moved buffer is seen
            y = patched(x[None])[0]
        self.assertLess(relative_error(y.numpy(), run_block(original, x).numpy()), FP32_TOL)
        # A dtype move rebuilds the layer from the moved weights.
        model.to(torch.bfloat16)
        self.assertEqual(patched.flashmoe.storage_dtype, torch.bfloat16)
        with torch.no_grad():
            y = patched(x[None].bfloat16())[0]
        self.assertLess(relative_error(y.float().numpy(), run_block(original, x.bfloat16()).float().numpy()), 2e-2)

    def test_patched_model_compiles_fullgraph(self):
        model = self.build("qwen3_moe", seed=9)
        flashmoe.patch(model)
        ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(9))

        def forward(input_ids):
            return model(input_ids=input_ids, use_cache=False).logits

        compiled = torch.compile(forward, fullgraph=True, backend="aot_eager")
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids), forward(ids), rtol=1e-5, atol=1e-5)

    def test_unknown_model_type_is_left_alone(self):
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
        model = AutoModelForCausalLM.from_config(config)
        with self.assertLogs("flashmoe", level=logging.WARNING) as logs:
            self.assertEqual(flashmoe.patch(model), [])
        self.assertIn("llama", logs.output[0])

    def test_from_hf_block_adds_no_state_and_chunks_long_inputs(self):
        from check_transformers import moe_block, run_block

        model = self.build("qwen2_moe", seed=5)
        block = moe_block(model)
        layer = flashmoe.MoELayer.from_hf_block(block, model.config, max_tokens=16)
        self.assertEqual(list(layer.state_dict()), [])
        x = torch.randn(16, model.config.hidden_size)
        self.assertLess(relative_error(layer(x).numpy(), run_block(block, x).numpy()), FP32_TOL)
        flashmoe.patch(model, max_tokens=16)
        patched = moe_block(model)
        x = torch.randn(1, 41, model.config.hidden_size)  # 41 > max_tokens: three chunks
        with torch.no_grad():
            y = patched(x)
        self.assertLess(relative_error(y.numpy(), run_block(block, x[0])[None].numpy()), FP32_TOL)
        # inputs the original block accepts: non-contiguous, misaligned, another float dtype
        ref = run_block(block, x[0])[None]
        with torch.no_grad():
            wide = torch.cat([x, x], dim=-1)[..., : model.config.hidden_size]
            self.assertFalse(wide.is_contiguous())
            self.assertLess(relative_error(patched(wide).numpy(), ref.numpy()), FP32_TOL)
            buf = torch.empty(x.numel() + 1)
            shifted = buf[1:].view(x.shape)
            shifted.copy_(x)
            self.assertNotEqual(shifted.data_ptr() % 16, 0)
            self.assertLess(relative_error(patched(shifted).numpy(), ref.numpy()), FP32_TOL)
            y64 = patched(x.double())
            self.assertEqual(y64.dtype, torch.float64)
            self.assertLess(relative_error(y64.numpy(), ref.numpy()), FP32_TOL)
        model.train()
        with self.assertRaises(RuntimeError):
            patched(x)

    def test_transformers4_style_block_returns_router_logits(self):
        block = _Mixtral4Block(hidden=32, inter=16, experts=4, top_k=2)
        parent = torch.nn.Module()
        parent.block_sparse_moe = block
        parent.config = block.config
        names = flashmoe.patch(parent)
        self.assertEqual(names, ["block_sparse_moe"])
        x = torch.randn(2, 7, 32)
        with torch.no_grad():
            y, logits = parent.block_sparse_moe(x)
            y_ref, logits_ref = block(x)
        self.assertLess(relative_error(y.numpy(), y_ref.numpy()), FP32_TOL)
        torch.testing.assert_close(logits, logits_ref)


if torch is not None:
    class _Config:
        model_type = "mixtral"
        num_experts_per_tok = 2
        hidden_act = "silu"
        output_router_logits = False

    class _Expert(torch.nn.Module):
        def __init__(self, hidden, inter):
            super().__init__()
            self.w1 = torch.nn.Linear(hidden, inter, bias=False)
            self.w3 = torch.nn.Linear(hidden, inter, bias=False)
            self.w2 = torch.nn.Linear(inter, hidden, bias=False)

        def forward(self, x):
            return self.w2(torch.nn.functional.silu(self.w1(x)) * self.w3(x))

    class MixtralSparseMoeBlock(torch.nn.Module):
        """A transformers-4-style Mixtral block (per-expert modules, returns (hidden, router_logits))."""

        def __init__(self, hidden, inter, experts, top_k):
            super().__init__()
            self.config = _Config()
            self.top_k = top_k
            self.gate = torch.nn.Linear(hidden, experts, bias=False)
            self.experts = torch.nn.ModuleList(_Expert(hidden, inter) for _ in range(experts))

        def forward(self, hidden_states):
            b, s, h = hidden_states.shape
            x = hidden_states.view(-1, h)
            logits = self.gate(x)
            probs = torch.softmax(logits.float(), dim=-1)
            w, ids = torch.topk(probs, self.top_k, dim=-1)
            w = w / w.sum(dim=-1, keepdim=True)
            y = torch.zeros_like(x)
            for t in range(x.shape[0]):
                for j in range(self.top_k):
                    y[t] += w[t, j] * self.experts[int(ids[t, j])](x[t])
            return y.view(b, s, h), logits

    _Mixtral4Block = MixtralSparseMoeBlock


if __name__ == "__main__":
    unittest.main()
