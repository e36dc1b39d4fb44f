"""Unit tests of torch_moe_baseline.py's fp8 baselines.

The plain-Python parts (options, plans, memory estimates, scale layouts, the record and its log line) run
everywhere. With torch installed (CPU is enough; PyPI's Linux torch is the CUDA build, which runs these on a
machine without a GPU), the rest runs too:
- the E4M3 quantization rules on CPU;
- both fp8 implementations and `--check`'s float64 references, with the two fp8 GEMMs replaced by CPU emulations of
  their documented semantics, including a planted wrong scale that the check must catch;
- the exact calls of both implementations on fake CUDA tensors (FakeTensorMode), where torch's own shape and
  stride rules for F.scaled_mm (aten._scaled_mm_v2) and torch._scaled_grouped_mm (torch/_meta_registrations.py)
  judge every argument as the GPU would receive it;
- a whole `--precisions fp8 --check` run on the CPU with the GPU-only parts stubbed.

    python3 -m unittest discover -s Benchmarks -p 'test_*.py'
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import io
import json
import logging
import os
import sys
import tempfile
import unittest
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
import torch_moe_baseline as tmb  # noqa: E402  (imports without torch by design)

HAS_TORCH = importlib.util.find_spec("torch") is not None
NO_TORCH = "torch is not installed (the GPU host and a CPU torch run these)"
QWEN = benchlib.PRESETS["qwen3-30b-a3b"]
DSV3 = benchlib.PRESETS["deepseek-v3"]


class Fp8OptionTests(unittest.TestCase):
    def test_default_precisions_are_unchanged(self):
        a = tmb.parse_args([])
        self.assertEqual(a.precisions, ["tf32", "bf16"])
        self.assertEqual(a.fp8_row_align, 4)

    def test_fp8_is_accepted_when_asked_for(self):
        self.assertEqual(tmb.parse_args(["--precisions", "fp8"]).precisions, ["fp8"])
        a = tmb.parse_args(["--precisions", "bf16,fp8", "--fp8-row-align", "16", "--tokens", "1,64,4096"])
        self.assertEqual((a.precisions, a.fp8_row_align, a.tokens), (["bf16", "fp8"], 16, [1, 64, 4096]))
        for bad in (["--fp8-row-align", "0"], ["--fp8-row-align", "129"], ["--precisions", "fp8,e5m2"]):
            with self.subTest(argv=bad), contextlib.redirect_stderr(io.StringIO()):
                with self.assertRaises(SystemExit):
                    tmb.parse_args(bad)

    def test_help_names_fp8(self):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), self.assertRaises(SystemExit):
            tmb.parse_args(["--help"])
        self.assertIn("fp8", out.getvalue())
        self.assertIn("--fp8-row-align", out.getvalue())


class Fp8PlanTests(unittest.TestCase):
    def test_both_implementations_run_fp8(self):
        a = tmb.parse_args(["--precisions", "fp8"])
        self.assertEqual(tmb.plan_case(a, "qwen3-30b-a3b", "fp8"), (["loop", "grouped"], False, []))
        c = tmb.parse_args(["--precisions", "fp8", "--check"])
        self.assertEqual(tmb.plan_case(c, "qwen3-30b-a3b", "fp8"), (["loop", "grouped"], True, []))
        # Not asked for: nothing of fp8 is built, not even with --check.
        d = tmb.parse_args(["--check"])
        self.assertEqual(tmb.plan_case(d, "qwen3-30b-a3b", "fp8"), ([], False, []))

    def test_fp8_checks_what_it_times(self):
        a = tmb.parse_args(["--precisions", "fp8", "--check", "--skip", "deepseek-v3:loop:fp8"])
        self.assertEqual(tmb.plan_case(a, "deepseek-v3", "fp8"),
                         (["grouped"], True, ["deepseek-v3:loop:fp8 (--skip)"]))
        b = tmb.parse_args(["--precisions", "fp8", "--check", "--skip", "deepseek-v3::fp8"])
        self.assertEqual(tmb.plan_case(b, "deepseek-v3", "fp8"),
                         ([], False, ["deepseek-v3:loop:fp8 (--skip)", "deepseek-v3:grouped:fp8 (--skip)"]))
        c = tmb.parse_args(["--precisions", "fp8", "--impls", "grouped"])
        self.assertEqual(tmb.plan_case(c, "paper-e32", "fp8"), (["grouped"], False, []))

    def test_existing_plans_are_unchanged(self):
        a = tmb.parse_args(["--check", "--precisions", "tf32,bf16"])
        self.assertEqual(tmb.plan_case(a, "paper-e32", "tf32"), (["loop"], True, []))
        self.assertEqual(tmb.plan_case(a, "paper-e32", "bf16"), (["loop", "grouped"], True, []))

    def test_precisions_to_build(self):
        def build(*argv):
            return tmb.precisions_to_build(tmb.parse_args(list(argv)))

        self.assertEqual(build(), ["tf32", "bf16"])
        self.assertEqual(build("--check", "--precisions", "tf32"), ["tf32", "bf16"])  # grouped's bf16 check
        self.assertEqual(build("--check", "--precisions", "fp8"), ["fp8"])  # grouped is checked at fp8 itself
        self.assertEqual(build("--check", "--precisions", "tf32,fp8"), ["tf32", "fp8"])
        self.assertEqual(build("--check", "--precisions", "tf32", "--impls", "loop"), ["tf32"])
        self.assertEqual(build("--precisions", "fp8,bf16"), ["fp8", "bf16"])


class Fp8LayoutTests(unittest.TestCase):
    def test_block_scale_shapes(self):
        self.assertEqual(tmb.fp8_block_scale_shape(2 * 768, 2048), (12, 16))  # qwen3 gate+up
        self.assertEqual(tmb.fp8_block_scale_shape(7168, 2048), (56, 16))  # deepseek-v3 down
        self.assertEqual(tmb.fp8_block_scale_shape(200, 129), (2, 2))  # a short last block counts
        self.assertEqual([tmb.fp8_padded_k_blocks(k) for k in (128, 768, 2048, 7168, 14336, 129)],
                         [4, 8, 16, 56, 112, 4])

    def test_weight_scales_are_padded_and_passed_transposed(self):
        # qwen3's down projection: K = I = 768 is 6 blocks, which cuBLASLt's leading dimension pads to 8.
        self.assertEqual(tmb.fp8_weight_scale_layout(2048, 768),
                         {"stored": (16, 8), "blocks": (16, 6), "passed": (8, 16), "strides": (1, 8)})
        self.assertEqual(tmb.fp8_weight_scale_layout(4096, 7168)["passed"], (56, 32))

    def test_activation_scales_are_outer_dim_major(self):
        self.assertEqual(tmb.fp8_activation_scale_layout(4, 2048), {"passed": (4, 16), "strides": (1, 4)})
        self.assertEqual(tmb.fp8_activation_scale_layout(1, 768), {"passed": (1, 6), "strides": (1, 1)})

    def test_shape_problem(self):
        for spec in benchlib.PRESETS.values():
            self.assertIsNone(tmb.fp8_shape_problem(spec), spec.name)
        odd = dataclasses.replace(QWEN, hidden=2000, inter=760)
        self.assertEqual(tmb.fp8_shape_problem(odd), "fp8 needs multiples of 128, got hidden 2000, intermediate 760")

    def test_scalings_follow_the_implementations(self):
        self.assertEqual(tmb.fp8_scalings(["grouped", "loop"]), ["blockwise", "rowwise"])
        self.assertEqual(tmb.fp8_scalings(["grouped"]), ["rowwise"])
        self.assertEqual(tmb.fp8_scalings([]), [])


class Fp8SizeTests(unittest.TestCase):
    def test_element_and_storage_bytes(self):
        self.assertEqual((benchlib.ELEMENT_BYTES["fp8"], benchlib.STORAGE_BYTES["fp8"]), (1, 2))
        for p in ("tf32", "fp32", "bf16", "fp16"):
            self.assertEqual(benchlib.STORAGE_BYTES[p], benchlib.ELEMENT_BYTES[p], p)

    def test_layer_bytes_count_fp8_experts_at_one_byte(self):
        spec = DSV3
        b = benchlib.layer_bytes(spec, 64, 222, 2, expert_bytes=1)
        self.assertEqual(b, 222 * 3 * 7168 * 2048 + 256 * 7168 * 2 + 256 * 4 + 3 * 7168 * 2048 * 2
                         + 2 * 64 * 7168 * 2)
        self.assertEqual(benchlib.layer_bytes(spec, 64, 222, 2), benchlib.layer_bytes(spec, 64, 222, 2, 2))

    def test_scale_bytes(self):
        E = QWEN.experts
        self.assertEqual(tmb.fp8_scale_bytes(QWEN, "blockwise"), 4 * E * (12 * 16 + 16 * 8))
        self.assertEqual(tmb.fp8_scale_bytes(QWEN, "rowwise"), 4 * E * (1536 + 2048))
        with self.assertRaises(ValueError):
            tmb.fp8_scale_bytes(QWEN, "tensorwise")

    def test_weight_estimate(self):
        codes = QWEN.experts * 3 * 2048 * 768
        base = tmb.weight_bytes_estimate(QWEN, "bf16") + tmb.FP8_QUANT_SCRATCH
        both = base + 2 * codes + tmb.fp8_scale_bytes(QWEN, "blockwise") + tmb.fp8_scale_bytes(QWEN, "rowwise")
        self.assertEqual(tmb.weight_bytes_estimate(QWEN, "fp8"), both)
        self.assertEqual(tmb.weight_bytes_estimate(QWEN, "fp8", ["loop"]),
                         base + codes + tmb.fp8_scale_bytes(QWEN, "blockwise"))
        # The other precisions do not depend on the implementations.
        self.assertEqual(tmb.weight_bytes_estimate(QWEN, "bf16", ["loop"]), tmb.weight_bytes_estimate(QWEN, "bf16"))
        # DeepSeek-V3 at its peak: the bf16 layer (45 GB) and two sets of codes (2 x 11 GB) fit an H200.
        self.assertLess(tmb.weight_bytes_estimate(DSV3, "fp8") / 2**30, 80)

    def test_workspace_estimate(self):
        bf16 = tmb.workspace_estimate(QWEN, "bf16", 4096, 2, 16)
        fp8 = tmb.workspace_estimate(QWEN, "fp8", 4096, 2, 16)
        self.assertGreater(fp8, bf16)
        n = 4096 * 8 + 128 * 16
        self.assertEqual(fp8 - bf16, 2 * (n * (2048 + 768) + n * 2048 * 4 + 2 * n * (2048 + 2 * 768) * 4))


class Fp8RecordTests(unittest.TestCase):
    def record(self, impl, prec="fp8"):
        r = {"preset": "qwen3-30b-a3b", "tokens": 64, "impl": impl, "precision": prec, "median_ms": 0.5,
             "min_ms": 0.45, "tflops": 12.3, "floor_ms": 0.1, "experts_touched": 128.0}
        if prec == "fp8":
            r.update(tmb.fp8_record(impl, 4, "measured"))
        return r

    def test_record_fields(self):
        loop, grouped = tmb.fp8_record("loop", 4, None), tmb.fp8_record("grouped", 4, "2 x bf16 (...)")
        self.assertEqual((loop["scaling"], loop["row_align"], loop["fast_accum"], loop["fp8_rate"]),
                         ("blockwise", 4, False, "measured"))
        self.assertEqual((grouped["scaling"], grouped["row_align"], grouped["fp8_rate"]),
                         ("rowwise", None, "2 x bf16 (...)"))
        self.assertIn("coarser", grouped["scaling_detail"])
        self.assertIn("_scaled_grouped_mm", grouped["fp8_api"])
        self.assertIn("scaled_mm", loop["fp8_api"])
        json.dumps(loop)

    def test_one_compact_line_per_case(self):
        for impl, label in (("loop", "fp8/block"), ("grouped", "fp8/row")):
            line = tmb.case_line(self.record(impl))
            self.assertNotIn("\n", line)
            self.assertIn(f"{impl:<7} {label}: median    0.500 ms", line)
            self.assertLess(len(line), 160)
        self.assertEqual(tmb.precision_label(self.record("loop", "bf16")), "bf16")
        self.assertIn("grouped bf16: median", tmb.case_line(self.record("grouped", "bf16")))


# ---------------------------------------------------------------------------------------------------------------
# With torch.


def emulated_scaled_mm(a, scale_a, codes, scales, out_dtype=None):
    """F.scaled_mm's 1x128 x 128x128 semantics on the CPU: out = Σ_k a[m,k]·sa[m,k/128] · w[n,k]·sw[n/128,k/128],
    fp32 sums. Holds the scale layouts to what scaled_mm_blockwise promises torch."""
    torch = tmb.torch
    M, K = a.shape
    N = codes.shape[0]
    assert a.dtype == torch.float8_e4m3fn and codes.dtype == torch.float8_e4m3fn
    assert scale_a.shape == (M, K // 128) and (scale_a.stride(0) == 1 or K // 128 == 1), scale_a.stride()
    assert scale_a.stride(1) == M or K // 128 == 1, scale_a.stride()
    assert scales.shape == (N // 128, tmb.fp8_padded_k_blocks(K)) and scales.is_contiguous()
    av = (a.float().view(M, K // 128, 128) * scale_a.unsqueeze(-1)).view(M, K)
    return (av @ tmb.dequantize_weights(codes, scales, "blockwise").float().T).to(out_dtype or torch.bfloat16)


def emulated_scaled_grouped_mm(a, b_t, scale_a, scale_b, offs=None, out_dtype=None, use_fast_accum=False):
    """torch._scaled_grouped_mm's 2d x 3d rowwise semantics on the CPU: rows offs[g-1]:offs[g] of a times group g
    of b_t [G, K, N], out = (a·sa) @ (b·sb), bf16; rows past offs[-1] are left zero."""
    torch = tmb.torch
    assert b_t.stride(1) == 1 and scale_a.dim() == 1 and scale_b.shape == (b_t.shape[0], b_t.shape[2])
    out = torch.zeros(a.shape[0], b_t.shape[2])
    prev = 0
    for g, end in enumerate(offs.tolist()):
        if end > prev:
            out[prev:end] = (a[prev:end].float() * scale_a[prev:end, None]) @ (b_t[g].float() * scale_b[g][None, :])
        prev = end
    return out.to(torch.bfloat16)


@unittest.skipUnless(HAS_TORCH, NO_TORCH)
class TorchFp8Tests(unittest.TestCase):
    def setUp(self):
        self.torch = tmb.bind_torch()
        self.cpu = self.torch.device("cpu")
        patches = [mock.patch.object(tmb, "SCALED_MM", emulated_scaled_mm),
                   mock.patch.object(tmb, "SCALED_GROUPED_MM", emulated_scaled_grouped_mm)]
        for p in patches:
            p.start()
            self.addCleanup(p.stop)

    def layer(self, spec, scalings=("blockwise", "rowwise"), seed=3):
        return tmb.Fp8Layer(tmb.Layer(spec, self.torch.bfloat16, self.cpu, seed), list(scalings))

    def test_quantization_rule(self):
        torch = self.torch
        x = torch.zeros(2, 256)
        x[0, :128] = torch.linspace(-3, 6, 128)
        x[0, 128:] = 1e-3
        q, s = tmb.quantize_groups(x)
        self.assertEqual(tuple(s.shape), (2, 2))
        self.assertEqual(s[0, 0].item(), (torch.tensor(6.0) / 448.0).item())
        self.assertEqual(q[0, 127].float().item(), 448.0)  # the group's largest value gets the largest code
        self.assertEqual(s[1].tolist(), [1.0, 1.0])  # an all-zero group has scale 1 and zero codes
        self.assertEqual(q[1].float().abs().sum().item(), 0.0)
        back = q.float().view(2, 2, 128) * s.unsqueeze(-1)
        self.assertLess((back.view(2, 256) - x).abs().max().item(), 6 * 2 ** -4)
        qr, sr = tmb.quantize_rows(x)
        self.assertEqual(sr.tolist(), [s[0, 0].item(), 1.0])  # one scale per row, from the row's largest |v|
        self.assertEqual(qr[0].float().max().item(), 448.0)
        # Rowwise is coarser: 1e-3 next to a 6 becomes a small code (0.078125, standing for 1.05e-3), where its own
        # group's scale gives it the largest one.
        self.assertEqual((qr[0, 128].float().item(), q[0, 128].float().item()), (0.078125, 448.0))

    def test_weight_quantization_layouts(self):
        torch = self.torch
        w = torch.randn(3, 256, 384, generator=torch.Generator().manual_seed(0))
        w[1, :128, 128:256] *= 64  # one block of its own magnitude
        q, s = tmb.quantize_weights(w, "blockwise")
        self.assertEqual((q.dtype, tuple(q.shape), tuple(s.shape)), (torch.float8_e4m3fn, (3, 256, 384), (3, 2, 4)))
        self.assertEqual(s[:, :, 3].unique().tolist(), [1.0])  # the padded K block
        self.assertAlmostEqual(s[1, 0, 1].item() / s[1, 0, 0].item(), 64, delta=32)
        back = tmb.dequantize_weights(q[1], s[1], "blockwise")
        self.assertLess(((back - w[1].double()).norm() / w[1].double().norm()).item(), 0.05)
        qr, sr = tmb.quantize_weights(w, "rowwise")
        self.assertEqual(tuple(sr.shape), (3, 256))
        back = tmb.dequantize_weights(qr[2], sr[2], "rowwise")
        self.assertLess(((back - w[2].double()).norm() / w[2].double().norm()).item(), 0.05)

    def test_both_implementations_match_their_float64_references(self):
        torch = self.torch
        for name, kw in (("qwen3-30b-a3b", dict(hidden=512, inter=256, experts=8)),
                         ("deepseek-v3", dict(hidden=512, inter=256, experts=16)),
                         ("paper-e32", dict(hidden=256, inter=384, experts=8))):
            spec = dataclasses.replace(benchlib.PRESETS[name], **kw)
            layer = self.layer(spec)
            with torch.inference_mode(), contextlib.redirect_stdout(io.StringIO()) as log:
                bad, unsupported = tmb.run_checks_fp8(layer, 48, 1, ["loop", "grouped"], 1, 4)
            self.assertEqual((bad, unsupported), ([], {}), name + log.getvalue())
            self.assertEqual(log.getvalue().count("MISMATCH"), 0, log.getvalue())
            self.assertEqual(log.getvalue().count("check grouped fp8 (rowwise, align"), 2)  # align 1 and 16
            x = tmb.fp8_check_input(5, spec.hidden, 9, self.cpu)
            ids, w = tmb.route(layer, x)
            for impl, align, row_align in (("loop", 1, 1), ("loop", 1, 4), ("grouped", 1, 4), ("grouped", 8, 4)):
                out = tmb.forward_fp8(impl, layer, x, align, row_align)
                self.assertEqual((out.dtype, tuple(out.shape)), (torch.bfloat16, (5, spec.hidden)))
                ref = tmb.reference_fp8(layer, x, ids, w, tmb.FP8_SCALING[impl])
                self.assertLess(tmb.rel_err(out, ref), tmb.TOL_VS_FP64["fp8"], f"{name} {impl} {align}")

    def test_the_check_catches_a_scale_from_the_wrong_block(self):
        torch = self.torch

        def wrong_block(a, scale_a, codes, scales, out_dtype=None):
            kb = a.shape[1] // 128
            rolled = scales.clone()
            rolled[:, :kb] = scales[:, :kb].roll(1, dims=1)
            return emulated_scaled_mm(a, scale_a, codes, rolled, out_dtype)

        layer = self.layer(dataclasses.replace(QWEN, hidden=512, inter=256, experts=8), ["blockwise"])
        with mock.patch.object(tmb, "SCALED_MM", wrong_block), torch.inference_mode(), \
                contextlib.redirect_stdout(io.StringIO()):
            bad, _ = tmb.run_checks_fp8(layer, 48, 1, ["loop"], 1, 4)
        self.assertEqual(len(bad), 1)
        self.assertIn("vs float64 on its codes and scales", bad[0])

    def test_an_api_that_raises_is_unsupported_not_failed(self):
        torch = self.torch

        def refuses(*args, **kwargs):
            raise NotImplementedError("DeepSeek style (1x128, 128x128) scaling only supported in CUDA for SM90\nmore")

        layer = self.layer(dataclasses.replace(QWEN, hidden=256, inter=128, experts=4, top_k=2))
        with mock.patch.object(tmb, "SCALED_MM", refuses), torch.inference_mode(), \
                contextlib.redirect_stdout(io.StringIO()):
            bad, unsupported = tmb.run_checks_fp8(layer, 16, 1, ["loop", "grouped"], 1, 4)
            probed = tmb.probe_fp8(self.cpu, ["loop", "grouped"])
        self.assertEqual(bad, [])
        expected = "NotImplementedError: DeepSeek style (1x128, 128x128) scaling only supported in CUDA for SM90"
        self.assertEqual(unsupported, {"loop": expected})
        self.assertEqual(probed, {"loop": expected})
        with mock.patch.object(tmb, "SCALED_GROUPED_MM", None):
            self.assertIn("has no torch._scaled_grouped_mm", tmb.probe_fp8(self.cpu, ["grouped"])["grouped"])

    def test_scales_are_restored_after_the_check(self):
        layer = self.layer(dataclasses.replace(QWEN, hidden=256, inter=128, experts=4, top_k=2))
        before = {k: [t.clone() for t in v] for k, v in layer.q.items()}
        for sc in ("blockwise", "rowwise"):
            with self.assertRaises(KeyError), tmb.distorted_scales(layer, sc):
                self.assertFalse(self.torch.equal(layer.q[sc][1], before[sc][1]))
                raise KeyError("an exception inside leaves them restored too")
        for k, v in layer.q.items():
            for t, b in zip(v, before[k]):
                self.assertTrue(self.torch.equal(t.view(self.torch.uint8), b.view(self.torch.uint8)), k)

    def test_torch_api_contracts_on_fake_cuda_tensors(self):
        """Both implementations' real calls (not the emulations) on fake CUDA tensors: torch's meta functions for
        aten._scaled_mm_v2 and aten._scaled_grouped_mm check every shape, dtype and stride as for the GPU."""
        torch = self.torch
        try:
            from torch._subclasses.fake_tensor import FakeTensorMode
            with FakeTensorMode():
                torch.empty(1, device="cuda")
        except Exception as e:  # noqa: BLE001  (a torch without CUDA support cannot fake CUDA tensors)
            self.skipTest(f"no fake CUDA tensors here: {e}")
        if not hasattr(torch.nn.functional, "scaled_mm"):
            self.skipTest("this torch has no torch.nn.functional.scaled_mm")
        for name, real in (("SCALED_MM", tmb.scaled_mm_blockwise), ("SCALED_GROUPED_MM", torch._scaled_grouped_mm)):
            p = mock.patch.object(tmb, name, real)  # the real fp8 GEMMs, not setUp's emulations
            p.start()
            self.addCleanup(p.stop)
        # The refusal below is expected; fake tensors log the meta function's traceback at ERROR level.
        quiet = mock.patch.object(logging.getLogger("torch._subclasses.fake_tensor"), "disabled", True)
        quiet.start()
        self.addCleanup(quiet.stop)
        for name, experts in (("qwen3-30b-a3b", 16), ("deepseek-v3", 32), ("mixtral-8x7b", 8)):
            spec = dataclasses.replace(benchlib.PRESETS[name], experts=experts)
            S = 7
            counts = [1, 0, 3, 5, 2] + [0] * (experts - 5)
            counts[5] = S * spec.top_k - sum(counts)
            with FakeTensorMode():
                layer = fake_fp8_layer(spec)
                x = torch.empty(S, spec.hidden, dtype=torch.bfloat16, device="cuda")
                for align in (1, 16):
                    y = tmb.forward_grouped_fp8(layer, x, align)
                    self.assertEqual((tuple(y.shape), y.dtype), ((S, spec.hidden), torch.bfloat16))
                with mock.patch.object(tmb, "expert_counts", lambda flat, e: counts):
                    for row_align in (1, 4):
                        y = tmb.forward_loop_fp8(layer, x, row_align)
                        self.assertEqual((tuple(y.shape), y.dtype), ((S, spec.hidden), torch.bfloat16))
                # torch refuses the unpadded 128x128 scales where K blocks are not a multiple of 4 (qwen3's
                # down projection, 6 blocks): the padding is needed, not decoration.
                if name == "qwen3-30b-a3b":
                    codes, scales = layer.q["blockwise"][2][0], layer.q["blockwise"][3][0]
                    a = torch.empty(4, spec.inter, device="cuda").to(torch.float8_e4m3fn)
                    sa = tmb.outer_dim_major(torch.empty(4, spec.inter // 128, device="cuda"))
                    tmb.scaled_mm_blockwise(a, sa, codes, scales)
                    with self.assertRaises(RuntimeError):
                        tmb.scaled_mm_blockwise(a, sa, codes, scales[:, :spec.inter // 128].contiguous())

    def test_outer_dim_major_for_one_row(self):
        s = self.torch.arange(6.0).view(1, 6)
        t = tmb.outer_dim_major(s)
        self.assertEqual((t.stride(), t.tolist()), ((1, 1), s.tolist()))
        self.assertEqual(s.t().contiguous().t().stride(), (6, 1))  # why the helper exists

    def test_whole_run_on_cpu(self):
        """`--precisions fp8 --check` end to end, on a small qwen3-like preset, with the GPU-only calls stubbed."""
        torch = self.torch
        small = dataclasses.replace(QWEN, hidden=256, inter=128, experts=8, tokens=(3, 17))
        props = argparse.Namespace(name="CPU (test)", major=9, minor=0, total_memory=64 << 30)
        rates = {"bf16_tflops": 700.0, "tf32_tflops": 350.0, "fp32_tflops": 50.0, "copy_gbps": 4000.0}

        real_time_calls = tmb.time_calls
        with tempfile.TemporaryDirectory() as d, \
                mock.patch.dict(tmb.PRESETS, {"qwen3-30b-a3b": small}), \
                mock.patch.object(tmb, "load_torch", lambda device: self.cpu), \
                mock.patch.object(tmb, "SCALED_MM", emulated_scaled_mm), \
                mock.patch.object(tmb, "SCALED_GROUPED_MM", emulated_scaled_grouped_mm), \
                mock.patch.object(tmb, "measure_rates", lambda device: dict(rates)), \
                mock.patch.object(tmb, "measure_fp8_rate", lambda device, bf16: (1400.0, "measured")), \
                mock.patch.object(tmb, "time_calls",
                                  lambda fn, inputs, w, r, before_each=None, cuda=True:
                                  real_time_calls(fn, inputs, w, r, before_each, cuda=False)), \
                mock.patch.object(torch.cuda, "get_device_properties", lambda device: props), \
                mock.patch.object(torch.cuda, "mem_get_info", lambda device: (64 << 30, 64 << 30)), \
                mock.patch.object(torch.cuda, "synchronize", lambda *a: None), \
                contextlib.redirect_stdout(io.StringIO()) as out:
            path = os.path.join(d, "t.json")
            rc = tmb.main(["--presets", "qwen3-30b-a3b", "--precisions", "fp8", "--check", "--check-tokens", "24",
                           "--repeats", "2", "--warmup", "1", "--json", path])
            with open(path) as f:
                records = json.load(f)
        text = out.getvalue()
        self.assertEqual(rc, 0, text)
        self.assertEqual([(r["impl"], r["tokens"], r["scaling"]) for r in records],
                         [("loop", 3, "blockwise"), ("grouped", 3, "rowwise"),
                          ("loop", 17, "blockwise"), ("grouped", 17, "rowwise")])
        for r in records:
            self.assertEqual((r["precision"], r["rates"]["fp8_tflops"]), ("fp8", 1400.0))
            # Experts at one byte, router and activations at two.
            self.assertEqual(r["bytes"], benchlib.layer_bytes(small, r["tokens"], r["experts_touched"], 2, 1))
        lines = [ln for ln in text.splitlines() if ": median" in ln]
        self.assertEqual(len(lines), 4, text)
        self.assertIn("fp8 loop blockwise", text)
        self.assertIn("fp8 1400 TFLOP/s (measured)", text)
        self.assertNotIn("bf16: median", text)  # --precisions fp8 --check builds no bf16 layer


def fake_fp8_layer(spec):
    """An Fp8Layer of `spec` on fake CUDA tensors (call inside FakeTensorMode): the bf16 layer's tensors are made
    empty, everything after that is the real code."""
    torch = tmb.torch
    dev = torch.device("cuda")
    base = tmb.Layer.__new__(tmb.Layer)
    base.spec, base.dtype, base.device = spec, torch.bfloat16, dev
    H, I, E = spec.hidden, spec.inter, spec.experts
    base.wg = torch.empty(E, H, dtype=torch.bfloat16, device=dev)
    base.w_in = torch.empty(E, (2 if spec.gated else 1) * I, H, dtype=torch.bfloat16, device=dev)
    base.w_out = torch.empty(E, H, I, dtype=torch.bfloat16, device=dev)
    base.bias = torch.empty(E, device=dev) if spec.router == "deepseek" else None
    base.ws_in = torch.empty(2 * spec.shared_inter, H, dtype=torch.bfloat16, device=dev) if spec.shared_inter else None
    base.ws_out = torch.empty(H, spec.shared_inter, dtype=torch.bfloat16, device=dev) if spec.shared_inter else None
    base.w_in_t, base.w_out_t = base.w_in.transpose(1, 2), base.w_out.transpose(1, 2)
    return tmb.Fp8Layer(base, ["blockwise", "rowwise"])


if __name__ == "__main__":
    unittest.main()
