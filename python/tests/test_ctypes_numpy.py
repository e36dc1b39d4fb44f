"""The C ABI through ctypes with numpy arrays, on the CPU backend: results against the float64 reference
(python/tests/reference.py), the ctypes structs against the header (compiled with cc), and every argument error.

Needs lib/libflashmoe.so (python/tests/run.sh builds it) and numpy; no torch.

    PYTHONPATH=python python3 -m unittest discover -s python/tests -v
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import flashmoe  # noqa: E402
from flashmoe import _lib  # noqa: E402
from flashmoe.config import MoEConfig  # noqa: E402
from reference import (from_bf16_bits, moe_reference, random_weights, relative_error,  # noqa: E402
                       to_bf16_bits)

REPO = HERE.parent.parent
HEADER = REPO / "include" / "flashmoe.h"
FP32_TOL = 1e-5
HALF_TOL = 1e-2


def small_config(**changes) -> MoEConfig:
    base = MoEConfig(hidden=32, intermediate=16, experts=8, top_k=2, max_tokens=64, precision="fp32")
    return base.replace(**changes)


def make_case(cfg: MoEConfig, seed: int, tokens: int, **weight_options):
    """Random weights (reference.random_weights) and a float32 x [tokens, H]."""
    rng = np.random.default_rng(seed)
    weights = random_weights(cfg, rng, **weight_options)
    return weights, rng.standard_normal((tokens, cfg.hidden)).astype(np.float32)


def misaligned(shape, dtype) -> np.ndarray:
    """A C-contiguous array whose address is 4 bytes past a 16-byte boundary."""
    count = int(np.prod(shape))
    item = np.dtype(dtype).itemsize
    raw = np.zeros(count * item + 64, dtype=np.uint8)
    start = (-raw.ctypes.data) % 16 + 4
    out = raw[start:start + count * item].view(dtype).reshape(shape)
    assert out.ctypes.data % 16 == 4 and out.flags.c_contiguous
    return out


class LibraryTest(unittest.TestCase):
    """Loading, the version, and raw status codes."""

    def test_loads_and_version_matches_header(self):
        self.assertEqual(flashmoe.version()[:2], (_lib.VERSION_MAJOR, _lib.VERSION_MINOR))
        self.assertTrue(Path(flashmoe.library_path()).is_file())

    def test_status_strings(self):
        for status in range(_lib.NUM_STATUS):
            self.assertTrue(_lib.status_string(status), status)

    def test_native_error_carries_status_and_message(self):
        handle = ctypes.c_void_p()
        status = _lib.lib().flashmoe_layer_create(None, None, ctypes.byref(handle))
        self.assertEqual(status, _lib.ERROR_INVALID_ARGUMENT)
        with self.assertRaises(flashmoe.FlashMoEError) as ctx:
            _lib.raise_for(status, "flashmoe_layer_create")
        err = ctx.exception
        self.assertIsInstance(err, RuntimeError)
        self.assertEqual(err.status, _lib.ERROR_INVALID_ARGUMENT)
        self.assertEqual(err.status_name, "FLASHMOE_ERROR_INVALID_ARGUMENT")
        self.assertIn("config", err.message)
        self.assertIn("config", str(err))

    def test_missing_library_lists_places_tried(self):
        with tempfile.TemporaryDirectory() as root:
            tmp = str(Path(root) / "repo" / "python")  # so the copy's "repository lib/" is root/repo/lib: absent
            shutil.copytree(REPO / "python" / "flashmoe", Path(tmp) / "flashmoe",
                            ignore=shutil.ignore_patterns("*.so", "__pycache__"))
            bogus = Path(tmp) / "not-a-library.so"
            bogus.write_text("not ELF")
            code = ("import flashmoe, sys\ntry:\n    flashmoe.version()\nexcept flashmoe.LibraryNotFoundError as e:\n"
                    "    print(e); sys.exit(3)\n")
            for env_value, expect in ((str(Path(tmp) / "missing.so"), "not found"), (str(bogus), "not-a-library")):
                proc = subprocess.run([sys.executable, "-c", code], cwd=tmp, capture_output=True, text=True,
                                      env=dict(os.environ, FLASHMOE_LIB=env_value, PYTHONPATH=tmp))
                self.assertEqual(proc.returncode, 3, proc.stderr)
                self.assertIn(expect, proc.stdout)
                self.assertIn("scripts/build-lib", proc.stdout)


@unittest.skipUnless(shutil.which("cc"), "no C compiler (cc) to compile the header's sizeof/offsetof program")
class HeaderLayoutTest(unittest.TestCase):
    """Every struct size, field offset and constant of the ctypes mirror equals the header's (compiled with cc)."""

    @classmethod
    def setUpClass(cls):
        structs = {"flashmoe_config_t": _lib.Config, "flashmoe_weights_t": _lib.Weights,
                   "flashmoe_layer_info_t": _lib.LayerInfo, "flashmoe_group_config_t": _lib.GroupConfig,
                   "flashmoe_group_info_t": _lib.GroupInfo}
        lines = ['#include "flashmoe.h"', "#include <stdio.h>", "#include <stddef.h>", "int main(void) {"]
        for cname, py in structs.items():
            lines.append(f'printf("sizeof {cname} %zu\\n", sizeof({cname}));')
            for field, _ in py._fields_:
                lines.append(f'printf("offsetof {cname}.{field} %zu\\n", offsetof({cname}, {field}));')
        cls.constants = {name: getattr(_lib, name.removeprefix("FLASHMOE_")) for name in (
            "FLASHMOE_VERSION", "FLASHMOE_CONFIG_MAGIC", "FLASHMOE_FLAG_SYNC_ERRORS", "FLASHMOE_FLAG_INJECT_FAULT",
            "FLASHMOE_SUCCESS", "FLASHMOE_ERROR_INVALID_ARGUMENT", "FLASHMOE_ERROR_UNSUPPORTED", "FLASHMOE_ERROR_CUDA",
            "FLASHMOE_ERROR_OUT_OF_MEMORY", "FLASHMOE_ERROR_KERNEL", "FLASHMOE_ERROR_INTERNAL", "FLASHMOE_NUM_STATUS",
            "FLASHMOE_ERROR_GROUP", "FLASHMOE_FLAG_STORAGE_RETURNS", "FLASHMOE_GROUP_WEIGHTS_ALL", "FLASHMOE_GROUP_WEIGHTS_SHARD",
            "FLASHMOE_BACKEND_CUDA", "FLASHMOE_BACKEND_CPU", "FLASHMOE_PRECISION_FP32", "FLASHMOE_PRECISION_TF32",
            "FLASHMOE_PRECISION_BF16", "FLASHMOE_PRECISION_FP16", "FLASHMOE_PRECISION_FP8", "FLASHMOE_FFN_PLAIN", "FLASHMOE_FFN_GATED",
            "FLASHMOE_ACT_RELU", "FLASHMOE_ACT_GELU", "FLASHMOE_ACT_GELU_TANH", "FLASHMOE_ACT_SILU",
            "FLASHMOE_ROUTER_SOFTMAX", "FLASHMOE_ROUTER_SIGMOID", "FLASHMOE_LAYOUT_FUSED", "FLASHMOE_LAYOUT_SEPARATE",
            "FLASHMOE_OUTPUT_STORAGE", "FLASHMOE_OUTPUT_FLOAT32")}
        for name in cls.constants:
            lines.append(f'printf("const {name} %lld\\n", (long long)({name}));')
        # The INIT macros, field by field.
        lines.append("flashmoe_config_t c = FLASHMOE_CONFIG_INIT; flashmoe_weights_t w = FLASHMOE_WEIGHTS_INIT;")
        for field, _ in _lib.Config._fields_:
            lines.append(f'printf("init config.{field} %.17g\\n", (double)c.{field});')
        lines.append('printf("init weights.size %zu\\ninit weights.version %u\\ninit weights.layout %d\\n", '
                     "w.size, w.version, w.layout);")
        lines.append("flashmoe_group_config_t g = FLASHMOE_GROUP_CONFIG_INIT;")
        for field in ("size", "version", "world_size", "rank", "weights"):
            lines.append(f'printf("init group.{field} %.17g\\n", (double)g.{field});')
        lines.append('printf("init group.callbacks %d\\n", g.allgather == NULL && g.ctx == NULL);')
        lines.append("return 0; }")
        with tempfile.TemporaryDirectory() as tmp:
            src, exe = Path(tmp) / "layout.c", Path(tmp) / "layout"
            src.write_text("\n".join(lines) + "\n")
            subprocess.run(["cc", "-std=c11", "-Wall", "-Werror", "-I", str(HEADER.parent), str(src), "-o", str(exe)],
                           check=True, capture_output=True, text=True)
            out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
        cls.c_values = {}
        for line in out.splitlines():
            kind, name, value = line.split()
            cls.c_values[(kind, name)] = float(value)

    def test_struct_sizes_and_offsets(self):
        for cname, py in (("flashmoe_config_t", _lib.Config), ("flashmoe_weights_t", _lib.Weights),
                          ("flashmoe_layer_info_t", _lib.LayerInfo), ("flashmoe_group_config_t", _lib.GroupConfig),
                          ("flashmoe_group_info_t", _lib.GroupInfo)):
            self.assertEqual(ctypes.sizeof(py), self.c_values[("sizeof", cname)], cname)
            for field, _ in py._fields_:
                self.assertEqual(getattr(py, field).offset, self.c_values[("offsetof", f"{cname}.{field}")],
                                 f"{cname}.{field}")

    def test_constants(self):
        for name, value in self.constants.items():
            self.assertEqual(value, self.c_values[("const", name)], name)

    def test_init_macros(self):
        c, w = _lib.Config.init(), _lib.Weights.init()
        for field, _ in _lib.Config._fields_:
            self.assertAlmostEqual(float(getattr(c, field)), self.c_values[("init", f"config.{field}")], 6, field)
        for field in ("size", "version", "layout"):
            self.assertEqual(getattr(w, field), self.c_values[("init", f"weights.{field}")], field)
        g = _lib.GroupConfig.init()
        for field in ("size", "version", "world_size", "rank", "weights"):
            self.assertEqual(getattr(g, field), self.c_values[("init", f"group.{field}")], field)
        self.assertEqual(self.c_values[("init", "group.callbacks")], 1)
        self.assertFalse(g.allgather)
        self.assertIsNone(g.ctx)


class ForwardTest(unittest.TestCase):
    """Results of the CPU backend against the float64 reference."""

    def run_case(self, cfg: MoEConfig, *, layout="fused", selection_bias=False, tokens=37, seed=0, tol=FP32_TOL):
        weights, x = make_case(cfg, seed, tokens, layout=layout, selection_bias=selection_bias)
        with flashmoe.Layer(cfg, weights) as layer:
            y, ids, w = layer.forward(x)
        ref_y, ref_ids, ref_w = moe_reference(cfg, weights, x)
        self.assertEqual(y.dtype, np.float32)
        self.assertEqual(ids.dtype, np.int32)
        self.assertEqual(w.dtype, np.float32)
        self.assertEqual(y.shape, (tokens, cfg.hidden))
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_allclose(w, ref_w, rtol=1e-5, atol=1e-6)
        self.assertLess(relative_error(y, ref_y), tol)
        return y

    def test_gated_silu_softmax_renormalised(self):
        self.run_case(small_config())

    def test_separate_layout_equals_fused(self):
        cfg = small_config(shared_intermediate=24)
        rng = np.random.default_rng(5)
        fused = random_weights(cfg, rng)
        i, si = cfg.intermediate, cfg.shared_intermediate
        separate = {"router": fused["router"], "down": fused["down"], "shared_down": fused["shared_down"],
                    "gate": np.ascontiguousarray(fused["gate_up"][:, :i]),
                    "up": np.ascontiguousarray(fused["gate_up"][:, i:]),
                    "shared_gate_up": np.ascontiguousarray(fused["shared_gate_up"][:si]),
                    "shared_up": np.ascontiguousarray(fused["shared_gate_up"][si:])}
        x = rng.standard_normal((19, cfg.hidden)).astype(np.float32)
        with flashmoe.Layer(cfg, fused) as a, flashmoe.Layer(cfg, separate) as b:
            ya, ia, wa = a.forward(x)
            yb, ib, wb = b.forward(x)
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(wa, wb)
        np.testing.assert_allclose(ya, yb, rtol=1e-6, atol=1e-7)
        self.assertLess(relative_error(ya, moe_reference(cfg, fused, x)[0]), FP32_TOL)

    def test_plain_ffn_with_bias_every_activation(self):
        for act in ("relu", "gelu", "gelu_tanh", "silu"):
            with self.subTest(activation=act):
                self.run_case(small_config(ffn="plain", bias=True, activation=act), seed=1)

    def test_softmax_without_renormalisation_and_gated_shared_expert(self):  # Qwen2-MoE
        self.run_case(small_config(renormalize=False, shared_intermediate=24, shared_gated=True), seed=2)

    def test_sigmoid_group_router_with_bias_scaling_and_shared_expert(self):  # DeepSeek-V3
        cfg = small_config(experts=16, top_k=4, router="sigmoid", groups=4, groups_kept=2, scaling=2.5,
                           shared_intermediate=16)
        self.run_case(cfg, selection_bias=True, seed=3)
        self.run_case(cfg.replace(renormalize=False), selection_bias=True, seed=4)

    def test_softmax_with_scaling(self):
        self.run_case(small_config(scaling=1.5), seed=6)

    def test_capacity_drops(self):
        cfg = small_config(capacity_factor=0.5, experts=4)
        self.run_case(cfg, tokens=40, seed=7)

    def test_token_counts(self):
        cfg = small_config()
        for tokens in (0, 1, cfg.max_tokens):
            with self.subTest(tokens=tokens):
                if tokens:
                    self.run_case(cfg, tokens=tokens, seed=8)
                else:
                    rng = np.random.default_rng(8)
                    with flashmoe.Layer(cfg, random_weights(cfg, rng)) as layer:
                        y, ids, w = layer.forward(np.zeros((0, cfg.hidden), np.float32))
                    self.assertEqual((y.shape, ids.shape, w.shape), ((0, cfg.hidden), (0, 2), (0, 2)))

    def test_bf16_bits_and_fp16(self):
        rng = np.random.default_rng(9)
        cfg = small_config(precision="bf16")
        w32 = random_weights(cfg, rng)
        wbf = {k: to_bf16_bits(v) for k, v in w32.items()}
        x = to_bf16_bits(rng.standard_normal((21, cfg.hidden)).astype(np.float32))
        with flashmoe.Layer(cfg, wbf) as layer:
            self.assertEqual(layer.precision, "bf16")
            y, _, _ = layer.forward(x)
        ref = moe_reference(cfg, {k: from_bf16_bits(v) for k, v in wbf.items()}, from_bf16_bits(x))[0]
        self.assertLess(relative_error(y, ref), HALF_TOL)

        cfg16 = small_config(precision=None)
        w16 = {k: v.astype(np.float16) for k, v in random_weights(cfg16, rng).items()}
        x16 = rng.standard_normal((21, cfg16.hidden)).astype(np.float16)
        with flashmoe.Layer(cfg16, w16) as layer:
            self.assertEqual(layer.precision, "fp16")
            y, _, _ = layer.forward(x16)
        self.assertLess(relative_error(y, moe_reference(cfg16, w16, x16)[0]), HALF_TOL)

    def test_bf16_storage_rows(self):
        # storage_returns on a layer: each routed expert row is rounded to bf16 before the combine (the GPU kernel's
        # arithmetic with the flag). y moves by about one bf16 rounding of the rows, the routing not at all.
        rng = np.random.default_rng(11)
        cfg = small_config(precision="bf16")
        wbf = {k: to_bf16_bits(v) for k, v in random_weights(cfg, rng).items()}
        x = to_bf16_bits(rng.standard_normal((29, cfg.hidden)).astype(np.float32))
        with flashmoe.Layer(cfg, wbf) as plain, flashmoe.Layer(cfg.replace(storage_returns=True), wbf) as rows:
            y0, ids0, w0 = plain.forward(x)
            y1, ids1, w1 = rows.forward(x)
        np.testing.assert_array_equal(ids1, ids0)
        np.testing.assert_array_equal(w1, w0)
        self.assertFalse(np.array_equal(y1, y0), "the rows were rounded")
        self.assertLess(relative_error(y1, y0), 2.0 ** -7)
        ref = moe_reference(cfg, {k: from_bf16_bits(v) for k, v in wbf.items()}, from_bf16_bits(x))[0]
        self.assertLess(relative_error(y1, ref), HALF_TOL)

    def test_caller_outputs_and_no_routing(self):
        cfg = small_config()
        weights, x = make_case(cfg, 10, 9)
        y = np.full((9, cfg.hidden), np.nan, np.float32)
        ids = np.full((9, 2), -7, np.int32)
        w = np.full((9, 2), np.nan, np.float32)
        with flashmoe.Layer(cfg, weights) as layer:
            out = layer.forward(x, y=y, topk_ids=ids, topk_weights=w)
            self.assertIs(out[0], y)
            self.assertIs(out[1], ids)
            self.assertIs(out[2], w)
            y2, none_ids, none_w = layer.forward(x, routing=False)
        self.assertIsNone(none_ids)
        self.assertIsNone(none_w)
        np.testing.assert_array_equal(y, y2)
        self.assertLess(relative_error(y, moe_reference(cfg, weights, x)[0]), FP32_TOL)

    def test_weights_may_be_freed_after_creation(self):
        cfg = small_config()
        weights, x = make_case(cfg, 11, 5)
        ref = moe_reference(cfg, weights, x)[0]
        copies = {k: v.copy() for k, v in weights.items()}
        layer = flashmoe.Layer(cfg, copies)
        for v in copies.values():  # the library holds its own copy: overwriting ours changes nothing
            v[...] = np.nan
        del copies
        y, _, _ = layer.forward(x)
        layer.close()
        self.assertLess(relative_error(y, ref), FP32_TOL)

    def test_info(self):
        cfg = small_config(max_tokens=48)
        with flashmoe.Layer(cfg, random_weights(cfg, np.random.default_rng(12))) as layer:
            info = layer.info()
        self.assertEqual(info["max_tokens"], 48)
        self.assertEqual(info["backend"], _lib.BACKEND_CPU)
        self.assertGreater(info["weight_bytes"], 0)


class ArgumentErrorTest(unittest.TestCase):
    """Every argument problem raises TypeError/ValueError naming the argument, before any native call."""

    @classmethod
    def setUpClass(cls):
        cls.cfg = small_config()
        cls.rng = np.random.default_rng(20)
        cls.weights = random_weights(cls.cfg, cls.rng)
        cls.layer = flashmoe.Layer(cls.cfg, cls.weights)
        cls.x = cls.rng.standard_normal((6, cls.cfg.hidden)).astype(np.float32)

    @classmethod
    def tearDownClass(cls):
        cls.layer.close()

    def raises(self, exc, words, fn, *args, **kwargs):
        with self.assertRaises(exc) as ctx:
            fn(*args, **kwargs)
        for word in words:
            self.assertIn(word, str(ctx.exception))
        return ctx.exception

    # forward arguments
    def test_x_errors(self):
        f = self.layer.forward
        self.raises(TypeError, ["x", "numpy.ndarray"], f, self.x.tolist())
        self.raises(TypeError, ["x", "float32", "float64"], f, self.x.astype(np.float64))
        self.raises(ValueError, ["x", "[S, 32]"], f, self.x[:, :16].copy())
        self.raises(ValueError, ["x", "[S, 32]"], f, self.x.reshape(-1))
        wide = np.zeros((6, 64), np.float32)
        self.raises(ValueError, ["x", "contiguous"], f, wide[:, ::2])
        self.raises(ValueError, ["x", "aligned"], f, misaligned((6, 32), np.float32))
        self.raises(ValueError, ["x", "max_tokens", "64"], f, np.zeros((65, 32), np.float32))

    def test_output_errors(self):
        f, x = self.layer.forward, self.x
        self.raises(TypeError, ["y", "float32"], f, x, y=np.zeros((6, 32), np.float64))
        self.raises(ValueError, ["y", "[6, 32]"], f, x, y=np.zeros((5, 32), np.float32))
        ro = np.zeros((6, 32), np.float32)
        ro.setflags(write=False)
        self.raises(ValueError, ["y", "writable"], f, x, y=ro)
        self.raises(ValueError, ["y", "aligned"], f, x, y=misaligned((6, 32), np.float32))
        self.raises(TypeError, ["topk_ids", "int32", "int64"], f, x, topk_ids=np.zeros((6, 2), np.int64))
        self.raises(ValueError, ["topk_ids", "[6, 2]"], f, x, topk_ids=np.zeros((6, 3), np.int32))
        self.raises(ValueError, ["topk_weights", "contiguous"], f, x,
                    topk_weights=np.zeros((2, 6), np.float32).T)
        self.raises(TypeError, ["topk_weights", "numpy.ndarray"], f, x, topk_weights=[0.0])

    def test_closed_layer(self):
        layer = flashmoe.Layer(self.cfg, self.weights)
        layer.close()
        layer.close()  # idempotent
        self.raises(ValueError, ["closed"], layer.forward, self.x)

    # creation arguments
    def test_weight_errors(self):
        cfg, w = self.cfg, self.weights

        def make(**changes):
            d = dict(w)
            for k, v in changes.items():
                if v is None:
                    d.pop(k)
                else:
                    d[k] = v
            return flashmoe.Layer(cfg, d)

        self.raises(TypeError, ["config", "MoEConfig"], flashmoe.Layer, {"hidden": 32}, w)
        self.raises(TypeError, ["weights", "mapping"], flashmoe.Layer, cfg, [w["router"]])
        self.raises(ValueError, ["router"], make, router=None)
        self.raises(ValueError, ["down", "missing"], make, down=None)
        self.raises(ValueError, ["unknown", "w13"], make, w13=w["gate_up"])
        self.raises(ValueError, ["weights['down']", "[8, 32, 16]"], make, down=w["down"][:, :, :8].copy())
        self.raises(TypeError, ["weights['gate_up']", "float32", "float64"], make,
                    gate_up=w["gate_up"].astype(np.float64))
        self.raises(ValueError, ["weights['router']", "contiguous"], make,
                    router=np.asfortranarray(w["router"]))
        bad = misaligned(w["router"].shape, np.float32)
        bad[...] = w["router"]
        self.raises(ValueError, ["weights['router']", "aligned"], make, router=bad)
        self.raises(ValueError, ["gate_up", "gate", "not both"], make, gate=w["gate_up"][:, :16].copy())
        self.raises(ValueError, ["b1", "not used"], make, b1=np.zeros((8, 16), np.float32))
        self.raises(ValueError, ["selection_bias", "sigmoid"], make, selection_bias=np.zeros(8, np.float32))
        self.raises(TypeError, ["weights['router']", "numpy.ndarray"], make, router=w["router"].tolist())
        self.raises(TypeError, ["float32, bfloat16 or float16"], flashmoe.Layer, cfg.replace(precision=None),
                    {k: v.astype(np.float64) for k, v in w.items()})

    def test_config_errors(self):
        w = self.weights
        cases = [
            (dict(top_k=9), ValueError, ["config.top_k", "config.experts"]),
            (dict(hidden=0), ValueError, ["config.hidden", ">= 1"]),
            (dict(hidden=32.0), TypeError, ["config.hidden", "int"]),
            (dict(max_tokens=0), ValueError, ["config.max_tokens"]),
            (dict(activation="tanh"), ValueError, ["config.activation", "tanh"]),
            (dict(ffn="moe"), ValueError, ["config.ffn"]),
            (dict(router="topk"), ValueError, ["config.router"]),
            (dict(precision="fp4"), ValueError, ["config.precision"]),
            (dict(output="int8"), ValueError, ["config.output"]),
            (dict(bias=True), ValueError, ["config.bias", "plain"]),
            (dict(groups=2), ValueError, ["config.groups", "sigmoid"]),
            (dict(router="sigmoid", groups=3), ValueError, ["config.groups", "divide"]),
            (dict(router="sigmoid", groups=2, groups_kept=3), ValueError, ["config.groups_kept"]),
            (dict(scaling=float("nan")), ValueError, ["config.scaling"]),
            (dict(shared_gated=True), ValueError, ["config.shared_gated"]),
            (dict(shared_intermediate=-1), ValueError, ["config.shared_intermediate"]),
            (dict(capacity_factor=-1.0), ValueError, ["config.capacity_factor"]),
            (dict(wait_budget_ms=-5), ValueError, ["config.wait_budget_ms"]),
        ]
        for changes, exc, words in cases:
            with self.subTest(**{k: repr(v) for k, v in changes.items()}):
                self.raises(exc, words, flashmoe.Layer, self.cfg.replace(**changes), w)

    def test_library_refusals_are_flashmoe_errors(self):
        # Checked by the library itself: a CPU layer has no kernel to inject a fault into.
        err = self.raises(flashmoe.FlashMoEError, ["flags"], flashmoe.Layer, self.cfg.replace(inject_fault=True),
                          self.weights)
        self.assertEqual(err.status, _lib.ERROR_INVALID_ARGUMENT)
        # Storage rows need 16-bit rows: an fp32 layer refuses them, naming the flag.
        err = self.raises(flashmoe.FlashMoEError, ["FLASHMOE_FLAG_STORAGE_RETURNS", "16-bit"], flashmoe.Layer,
                          self.cfg.replace(storage_returns=True), self.weights)
        self.assertEqual(err.status, _lib.ERROR_INVALID_ARGUMENT)
        # A raw call with a stream on a CPU layer: the library names the stream.
        out = np.empty((6, 32), np.float32)
        err = self.raises(flashmoe.FlashMoEError, ["stream"], self.layer._native.forward_raw, self.x.ctypes.data,
                          out.ctypes.data, 6, 0, 0, 0x1234)
        self.assertEqual(err.status, _lib.ERROR_INVALID_ARGUMENT)
        # A raw call with more tokens than max_tokens: the library checks it too.
        err = self.raises(flashmoe.FlashMoEError, ["tokens"], self.layer._native.forward_raw, self.x.ctypes.data,
                          out.ctypes.data, 65, 0, 0, 0)
        self.assertEqual(err.status, _lib.ERROR_INVALID_ARGUMENT)


if __name__ == "__main__":
    unittest.main()
