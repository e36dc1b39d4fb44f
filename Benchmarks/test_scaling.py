"""Unit tests of the multi-GPU benchmark scripts: torch_ep_baseline.py's command line and dispatch bookkeeping,
and scaling.py's tables (plain Python). The tests that run torch skip when it is not installed:

    python3 -m unittest discover -s Benchmarks -p 'test_*.py'
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import benchlib  # noqa: E402
import scaling  # noqa: E402
import test_benchmarks  # noqa: E402  (its temp-file helper)
import torch_ep_baseline as tep  # noqa: E402  (imports without torch by design)

HAS_TORCH = importlib.util.find_spec("torch") is not None
NO_TORCH = "torch is not installed (the GPU host and a CPU torch run these)"


def parse_fails(testcase: unittest.TestCase, argv: list[str]) -> str:
    """parse_args must exit with a usage error; returns what it printed."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), testcase.assertRaises(SystemExit):
        tep.parse_args(argv)
    return err.getvalue()


class TorchEpArgsTests(unittest.TestCase):
    def test_defaults_follow_the_method(self):
        a = tep.parse_args([])
        self.assertEqual((a.presets, a.precisions, a.tokens_per_gpu, a.experts),
                         (["paper-e32", "paper-e64"], ["tf32", "bf16"], [8192], None))
        self.assertEqual((a.backend, a.device, a.expert_impl, a.check), ("nccl", "cuda", "auto", False))
        self.assertGreaterEqual(a.repeats, 20)
        self.assertGreaterEqual(a.warmup, 5)
        self.assertGreaterEqual(a.input_sets, 2)

    def test_lists_and_the_cpu_mode(self):
        a = tep.parse_args(["--tokens-per-gpu", "4096,8192,16384", "--experts", "8,16,128", "--iterations", "30",
                            "--device", "cpu", "--presets", "paper-e64", "--precisions", "bf16"])
        self.assertEqual((a.tokens_per_gpu, a.experts, a.repeats), ([4096, 8192, 16384], [8, 16, 128], 30))
        self.assertEqual((a.backend, a.device, a.presets, a.precisions), ("gloo", "cpu", ["paper-e64"], ["bf16"]))
        self.assertEqual(tep.parse_args(["--backend", "gloo", "--device", "cpu", "--repeats", "21"]).repeats, 21)

    def test_rejects_bad_input_with_the_option_named(self):
        for argv, says in ((["--presets", "nope"], "unknown presets nope"),
                           (["--precisions", "fp8"], "unknown precisions fp8"),
                           (["--tokens-per-gpu", "0"], "--tokens-per-gpu must be positive"),
                           (["--experts", "8,x"], "--experts takes positive integers"),
                           (["--iterations", "0"], "--repeats must be >= 1"),
                           (["--warmup", "-1"], "--warmup must be >= 0"),
                           (["--hidden", "0"], "--hidden must be >= 1"),
                           (["--check-tokens", "0"], "--check-tokens must be >= 1"),
                           (["--input-sets", "0"], "--input-sets must be >= 1"),
                           (["--backend", "nccl", "--device", "cpu"], "use nccl with cuda, gloo with cpu"),
                           (["--backend", "gloo"], "use nccl with cuda, gloo with cpu"),
                           (["--expert-impl", "fast"], "invalid choice"),
                           (["--json", "/nonexistent-dir/x.json"], "does not exist")):
            with self.subTest(argv=argv):
                self.assertIn(says, parse_fails(self, argv))

    def test_plan_cases_needs_experts_divisible_by_ranks(self):
        a = tep.parse_args([])
        self.assertEqual([s.experts for s in tep.plan_cases(a, 8)], [32, 64])
        with self.assertRaisesRegex(tep.BenchError, "E=32 experts do not split into 3 ranks"):
            tep.plan_cases(a, 3)
        b = tep.parse_args(["--presets", "paper-e64", "--experts", "8,16,32,64,128", "--hidden", "64"])
        specs = tep.plan_cases(b, 8)
        self.assertEqual([(s.name, s.experts, s.hidden, s.inter) for s in specs],
                         [("paper-e64", e, 64, 2048) for e in (8, 16, 32, 64, 128)])
        with self.assertRaisesRegex(tep.BenchError, "E=8 experts do not split into 16 ranks"):
            tep.plan_cases(b, 16)

    def test_overrides_the_router_cannot_take(self):
        ds = benchlib.PRESETS["deepseek-v3"]
        self.assertEqual(tep.layer_spec(ds, 16, None, None).experts, 16)  # 8 groups of 2, 4 kept: 8 >= top-8
        for e in (12, 8):  # 12 is not 8 groups; 8 gives 1 expert per group
            with self.subTest(e=e), self.assertRaisesRegex(ValueError, "divisible by 8 groups"):
                tep.layer_spec(ds, e, None, None)
        with self.assertRaisesRegex(ValueError, "top-2 needs at least 2 experts"):
            tep.layer_spec(benchlib.PRESETS["paper-e32"], 1, None, None)
        with self.assertRaisesRegex(tep.BenchError, "deepseek-v3 with E=12"):
            tep.plan_cases(tep.parse_args(["--presets", "deepseek-v3", "--experts", "12"]), 1)

    def test_expert_impl_choice(self):
        a = tep.parse_args([])
        self.assertEqual([tep.expert_impl_for(a, p) for p in ("bf16", "tf32")], ["grouped", "loop"])
        cpu = tep.parse_args(["--device", "cpu"])
        self.assertEqual(tep.expert_impl_for(cpu, "bf16"), "loop")
        forced = tep.parse_args(["--expert-impl", "grouped"])
        self.assertEqual(tep.expert_impl_for(forced, "tf32"), "grouped")


def received_rows(recv_counts: list[int], ranks: int) -> list[tuple[int, int, int]]:
    """(expert, source, i) of every row in the order all_to_all_single delivers them: source-major, and inside a
    source's block by local expert."""
    per = len(recv_counts) // ranks
    return [(e, s, i) for s in range(ranks) for e in range(per) for i in range(recv_counts[s * per + e])]


class DispatchBookkeepingTests(unittest.TestCase):
    def test_split_sizes_sum_contiguous_expert_blocks(self):
        self.assertEqual(tep.split_sizes([1, 2, 3, 4, 5, 6], 3), [3, 7, 11])
        self.assertEqual(tep.split_sizes([0, 0, 9, 1], 2), [0, 10])
        self.assertEqual(tep.split_sizes([4, 5], 1), [9])
        with self.assertRaisesRegex(ValueError, "5 counts do not split into 2 ranks"):
            tep.split_sizes([1] * 5, 2)

    def test_expert_major_positions_by_hand(self):
        # 2 sources, 2 local experts: source 0 sent 2 rows of e0 and 1 of e1, source 1 sent 1 of e0 and 3 of e1.
        recv = [2, 1, 1, 3]
        self.assertEqual(tep.local_expert_totals(recv, 2), [3, 4])
        self.assertEqual(tep.split_sizes(recv, 2), [3, 4])
        # received: s0e0 s0e0 s0e1 s1e0 s1e1 s1e1 s1e1 → expert-major: e0 = [s0, s0, s1], e1 = [s0, s1, s1, s1]
        self.assertEqual(tep.expert_major_positions(recv, 2), [0, 1, 3, 2, 4, 5, 6])

    def test_expert_major_positions_regroup_any_counts(self):
        rng = random.Random(5)
        for ranks, per in ((1, 4), (2, 1), (3, 2), (8, 4), (4, 16)):
            recv = [rng.choice([0, 0, 1, 2, 7]) for _ in range(ranks * per)]
            rows = received_rows(recv, ranks)
            pos = tep.expert_major_positions(recv, ranks)
            self.assertEqual(sorted(pos), list(range(len(rows))))  # a permutation
            grouped = [None] * len(rows)
            for j, p in enumerate(pos):
                grouped[p] = rows[j]
            self.assertEqual(grouped, sorted(rows))  # by expert, then source, each source's rows in order
            offsets = [sum(tep.local_expert_totals(recv, ranks)[:e + 1]) for e in range(per)]
            self.assertEqual(offsets[-1] if offsets else 0, len(rows))

    def test_record_has_the_issue_fields(self):
        a = tep.parse_args(["--iterations", "20", "--warmup", "5"])
        spec = benchlib.PRESETS["paper-e64"]
        times = [3.0, 1.0, 2.0, 5.0]
        r = tep.make_record(a, spec, "bf16", 8192, 8, times, "NVIDIA H200", "2026-01-01T00:00:00Z", "2.11.0")
        for key, want in (("impl", "torch-ep"), ("preset", "paper-e64"), ("experts", 64), ("tokens_per_gpu", 8192),
                          ("gpus", 8), ("precision", "bf16"), ("median_ms", 2.5), ("min_ms", 1.0),
                          ("date", "2026-01-01T00:00:00Z"), ("device", "NVIDIA H200"), ("expert_impl", "grouped")):
            self.assertEqual(r[key], want, key)
        self.assertIn("one host sync for the split sizes", r["method"])
        self.assertIn("torch._grouped_mm", r["method"])
        self.assertIn("max over ranks", r["method"])
        self.assertIn("median and min of 20 calls after 5 warm-up", r["method"])
        self.assertIn("E=64 k=2", r["config"])
        self.assertIn("8 experts per rank", r["config"])
        small = tep.layer_spec(spec, 128, 64, None)
        self.assertEqual(tep.make_record(a, small, "bf16", 16, 1, times, "x", "d", "t")["preset"],
                         "custom (from paper-e64)")
        self.assertEqual(tep.make_record(a, tep.layer_spec(spec, 128, None, None), "bf16", 16, 1, times, "x", "d",
                                         "t")["preset"], "paper-e64")  # E has a field of its own
        tf32 = tep.make_record(a, spec, "tf32", 8192, 8, times, "x", "d", "t")
        self.assertIn("per-expert matmul loop", tf32["method"])
        self.assertIn("TF32 matmuls", tf32["method"])

    def test_main_without_torch_fails_cleanly(self):
        if HAS_TORCH:
            self.skipTest("torch is installed here")
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            self.assertEqual(tep.main(["--device", "cpu"]), 2)
        self.assertIn("cannot import torch", err.getvalue())


# ---------------------------------------------------------------------------------------------------------------


def ep(preset: str, gpus: int, T: int, ms: float, precision: str = "bf16", experts: int | None = None) -> dict:
    return {"impl": "torch-ep", "preset": preset, "experts": experts or benchlib.PRESETS[preset].experts,
            "tokens_per_gpu": T, "gpus": gpus, "precision": precision, "median_ms": ms, "min_ms": ms}


def fm(preset: str, tokens: int, ms: float, precision: str = "bf16", ranks: int | None = None,
       devices: list[int] | None = None, **extra) -> dict:
    r = {"backend": "cuda", "preset": preset, "tokens": tokens, "precision": precision, "median_ms": ms,
         "min_ms": ms, "config": "H=2048 I=2048 E=64 k=2"}
    if ranks is not None:
        r["ranks"] = ranks
    if devices is not None:
        r["rank_devices"] = devices
    r.update(extra)
    return r


class ScalingTests(unittest.TestCase):
    write = test_benchmarks.CompareTests.write  # a JSON temp file, removed after the test

    def run_main(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = scaling.main(list(argv))
        return rc, out.getvalue(), err.getvalue()

    def tables(self, *argv: str) -> tuple[str, str]:
        """scaling.py's standard output and error; it must succeed."""
        rc, out, err = self.run_main(*argv)
        self.assertEqual(rc, 0, err)
        return out, err

    def table_rows(self, text: str, first_header: str) -> list[str]:
        """The data rows of the table whose header row starts with `first_header`."""
        lines = text.splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("| " + first_header))
        rows = []
        for line in lines[start + 2:]:
            if not line.startswith("|"):
                break
            rows.append(line)
        return rows

    def test_weak_scaling_efficiency_and_missing_points(self):
        f = self.write([
            fm("paper-e64", 8192, 2.0),                                     # 1 GPU, no ranks field
            fm("paper-e64", 16384, 2.5, ranks=2, devices=[0, 1]),           # 2 GPUs, T = 8192
            fm("paper-e64", 65536, 3.2, ranks=8, devices=list(range(8))),   # 8 GPUs
            fm("paper-e64", 4096, 9.9),                                     # another T: not in this table
        ])
        t = self.write([ep("paper-e64", 1, 8192, 3.0), ep("paper-e64", 2, 8192, 4.0), ep("paper-e64", 4, 8192, 5.0),
                        ep("paper-e64", 8, 8192, 6.0)])
        out, _ = self.tables(f, t)
        self.assertEqual(self.table_rows(out, "preset | precision | GPUs"), [
            "| paper-e64 | bf16 | 1 | 8192 | 2.000 | 3.000 | 100% | 100% | 1.50× |",
            "| paper-e64 | bf16 | 2 | 16384 | 2.500 | 4.000 | 80% | 75% | 1.60× |",
            "| paper-e64 | bf16 | 4 | 32768 | – | 5.000 | – | 60% | – |",
            "| paper-e64 | bf16 | 8 | 65536 | 3.200 | 6.000 | 62% | 50% | 1.88× |",
        ])
        self.assertNotIn("Token scaling", out)  # nothing on 8 GPUs at another T
        self.assertNotIn("Expert scaling", out)

    def test_efficiency_needs_the_one_gpu_point_and_other_counts_get_rows(self):
        t = self.write([ep("paper-e32", 2, 8192, 4.0, "tf32"), ep("paper-e32", 3, 8192, 4.5, "tf32")])
        out, _ = self.tables(t)
        rows = self.table_rows(out, "preset | precision | GPUs")
        self.assertEqual(rows[0], "| paper-e32 | tf32 | 1 | 8192 | – | – | – | – | – |")
        self.assertEqual(rows[1], "| paper-e32 | tf32 | 2 | 16384 | – | 4.000 | – | – | – |")
        self.assertEqual(rows[2], "| paper-e32 | tf32 | 3 | 24576 | – | 4.500 | – | – | – |")
        self.assertEqual(len(rows), 5)  # 1, 2, 3, 4, 8

    def test_token_and_expert_scaling_when_present(self):
        f = self.write([fm("custom (from paper-e64)", 8 * 8192, 1.5, ranks=8, devices=list(range(8)),
                           config="H=2048 I=2048 E=128 k=2, plain FFN"),
                        fm("paper-e64", 8 * 16384, 5.0, ranks=8, devices=list(range(8)))])
        t = self.write([ep("paper-e64", 8, 4096, 2.0), ep("paper-e64", 8, 8192, 3.0), ep("paper-e64", 8, 16384, 5.5),
                        ep("paper-e64", 8, 8192, 3.0, experts=8), ep("paper-e64", 8, 8192, 4.5, experts=128)])
        out, _ = self.tables(f, t)
        self.assertEqual(self.table_rows(out, "preset | precision | tokens per GPU"), [
            "| paper-e64 | bf16 | 4096 | 32768 | – | 2.000 | – |",
            "| paper-e64 | bf16 | 8192 | 65536 | – | 3.000 | – |",
            "| paper-e64 | bf16 | 16384 | 131072 | 5.000 | 5.500 | 1.10× |",
        ])
        self.assertEqual(self.table_rows(out, "preset | precision | experts"), [
            "| paper-e64 | bf16 | 8 | 1 | – | 3.000 | – |",
            "| paper-e64 | bf16 | 64 | 8 | – | 3.000 | – |",
            "| paper-e64 | bf16 | 128 | 16 | 1.500 | 4.500 | 3.00× |",
        ])
        # The E=8 and E=128 points are expert scaling only, not weak-scaling rows of their own.
        self.assertEqual(len(self.table_rows(out, "preset | precision | GPUs")), 4)

    def test_flashmoe_records_that_are_not_one_rank_per_gpu_are_left_out(self):
        f = self.write([fm("paper-e64", 16384, 1.0, ranks=2, devices=[0, 0]),
                        fm("paper-e64", 16384, 1.0, ranks=2),
                        fm("paper-e64", 8193, 1.0, ranks=2, devices=[0, 1]),
                        fm("paper-e64", 8192, 7.0, ranks=1, devices=[3]),
                        fm("paper-e32", 256, 100.0, precision="fp32", backend="cpu"),
                        {"impl": "grouped", "preset": "paper-e64", "tokens": 8192, "precision": "bf16",
                         "median_ms": 1.6}])
        out, err = self.tables(f)
        self.assertIn("ran 2 ranks on 1 GPU (rank_devices [0, 0])", err)
        self.assertIn("ran 2 ranks on 1 GPU (rank_devices [])", err)
        self.assertIn("8193 tokens do not split evenly over 2 GPUs", err)
        self.assertIn("left out 1 record of FlashMoE backend cpu", err)
        self.assertIn("left out 1 record of impl grouped", err)
        rows = self.table_rows(out, "preset | precision | GPUs")
        self.assertEqual(rows[0], "| paper-e64 | bf16 | 1 | 8192 | 7.000 | – | 100% | – | – |")
        self.assertEqual(rows[1], "| paper-e64 | bf16 | 2 | 16384 | – | – | – | – | – |")

    def test_the_pair_bench_ranks_writes(self):
        # `flashmoe bench --ranks 8 --rank-devices 0,...,7 --tokens 65536 --json` writes the single-GPU operator on
        # all 65536 tokens, then the ranks' record: only the second is the 8-GPU point at T = 8192.
        f = self.write([fm("paper-e64", 65536, 9.0), fm("paper-e64", 65536, 2.4, ranks=8, devices=list(range(8))),
                        fm("paper-e64", 8192, 2.0)])
        out, err = self.tables(f)
        self.assertEqual(err, "")
        rows = self.table_rows(out, "preset | precision | GPUs")
        self.assertEqual(rows[0], "| paper-e64 | bf16 | 1 | 8192 | 2.000 | – | 100% | – | – |")
        self.assertEqual(rows[3], "| paper-e64 | bf16 | 8 | 65536 | 2.400 | – | 83% | – | – |")
        self.assertNotIn("9.000", out)

    def test_a_repeated_point_keeps_the_later_record(self):
        a = self.write([ep("paper-e64", 1, 8192, 3.0)])
        b = self.write([ep("paper-e64", 1, 8192, 2.0)])
        out, err = self.tables(a, b)
        self.assertIn("repeats torch-ep paper-e64 E=64 bf16 on 1 GPU x 8192; using the later record", err)
        self.assertIn("| paper-e64 | bf16 | 1 | 8192 | – | 2.000 |", out)

    def test_options_choose_the_table_points(self):
        t = self.write([ep("paper-e64", 1, 4096, 1.0), ep("paper-e64", 4, 4096, 2.0), ep("paper-e64", 4, 2048, 1.5)])
        out, _ = self.tables(t, "--tokens-per-gpu", "4096", "--gpus", "4")
        self.assertIn("| paper-e64 | bf16 | 4 | 16384 | – | 2.000 | – | 50% | – |", out)
        self.assertIn("Token scaling on 4 GPUs", out)
        self.assertIn("| paper-e64 | bf16 | 2048 | 8192 | – | 1.500 | – |", out)

    def test_bad_input_exits_2(self):
        lacking = self.write([{"impl": "torch-ep", "preset": "paper-e64", "gpus": 2}])
        bad_devices = self.write([fm("paper-e64", 8192, 1.0, ranks=2, devices="0,1")])
        bad_ranks = self.write([fm("paper-e64", 8192, 1.0, ranks=0)])
        nothing = self.write([{"impl": "loop", "preset": "paper-e64", "tokens": 1, "precision": "bf16",
                               "median_ms": 1.0}])
        elsewhere = self.write([ep("paper-e64", 2, 1024, 1.0)])
        for path, says in ((lacking, "lacks experts"), (bad_devices, "rank_devices must be a list"),
                           (bad_ranks, "ranks must be a positive integer"), (nothing, "no FlashMoE GPU or torch-ep"),
                           (elsewhere, "no record at T = 8192"), ("/nonexistent.json", "cannot read")):
            with self.subTest(says=says):
                rc, _, err = self.run_main(path)
                self.assertEqual(rc, 2)
                self.assertIn(says, err)


# ---------------------------------------------------------------------------------------------------------------
# With torch (CPU): the device bookkeeping, the shared layer code, and whole runs over gloo.


@unittest.skipUnless(HAS_TORCH, NO_TORCH)
class TorchCpuTests(unittest.TestCase):
    write = test_benchmarks.CompareTests.write

    def setUp(self):
        self.torch = tep.bind_torch()

    def test_device_permutation_matches_the_pure_one(self):
        rng = random.Random(11)
        for ranks, per in ((2, 2), (3, 5), (8, 1), (4, 16)):
            recv = [rng.choice([0, 1, 3, 6]) for _ in range(ranks * per)]
            got = tep.expert_major_index(self.torch.tensor(recv, dtype=self.torch.int64), ranks, sum(recv))
            self.assertEqual(got.tolist(), tep.expert_major_positions(recv, ranks))

    def test_shared_layer_code_matches_the_float64_reference(self):
        import dataclasses

        tmb = tep.tmb
        torch = self.torch
        for name in ("paper-e32", "deepseek-v3"):
            spec = dataclasses.replace(benchlib.PRESETS[name], hidden=32, inter=16, experts=16)
            layer = tmb.Layer(spec, torch.float32, torch.device("cpu"), 3)
            x = torch.randn(24, 32, generator=torch.Generator().manual_seed(1))
            ids, w = tmb.route(layer, x)
            ref = tmb.reference_layer(layer, x, ids, w)
            outs = [tmb.forward_loop(layer, x)]
            if tmb.GROUPED_MM is not None:
                outs += [tmb.forward_grouped(layer, x, a) for a in (1, 8)]
            for out in outs:
                self.assertLess(tmb.rel_err(out, ref), 1e-5, name)

    def run_script(self, launcher: list[str], extra: list[str]) -> tuple[subprocess.CompletedProcess, list[dict]]:
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "ep.json")
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
            p = subprocess.run(launcher + [os.path.join(HERE, "torch_ep_baseline.py"), "--device", "cpu",
                                           "--hidden", "32", "--inter", "16", "--check", "--check-tokens", "24",
                                           "--iterations", "2", "--warmup", "1", "--json", out] + extra,
                               capture_output=True, text=True, env=env, timeout=600)
            records = []
            if os.path.exists(out):
                with open(out) as f:
                    records = json.load(f)
        return p, records

    def test_two_ranks_over_gloo_pass_the_check(self):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        for impl in ("loop", "grouped") if tep.tmb.GROUPED_MM is not None else ("loop",):
            with self.subTest(impl=impl):
                p, records = self.run_script(launcher, ["--presets", "paper-e32,deepseek-v3", "--experts", "16",
                                                        "--tokens-per-gpu", "40,8", "--expert-impl", impl])
                self.assertEqual(p.returncode, 0, p.stdout[-3000:] + p.stderr[-3000:])
                self.assertEqual(p.stdout.count("check torch-ep"), 4)
                self.assertEqual(len(records), 2 * 2 * 2)  # presets × precisions × T
                self.assertEqual({(r["gpus"], r["experts"], r["expert_impl"]) for r in records}, {(2, 16, impl)})
                self.assertEqual({r["preset"] for r in records},
                                 {"custom (from paper-e32)", "custom (from deepseek-v3)"})
                self.assertEqual(sorted({r["tokens_per_gpu"] for r in records}), [8, 40])
                self.assertTrue(all(0 < r["min_ms"] <= r["median_ms"] for r in records))
                out = io.StringIO()
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
                    self.assertEqual(scaling.main([self.write(records), "--tokens-per-gpu", "40", "--gpus", "2"]), 0)
                self.assertIn("| custom (from paper-e32) | tf32 | 2 | 80 | – |", out.getvalue())
                self.assertIn("Token scaling on 2 GPUs", out.getvalue())

    def test_one_rank_without_torchrun(self):
        p, records = self.run_script([sys.executable], ["--presets", "paper-e64", "--precisions", "bf16",
                                                        "--tokens-per-gpu", "16"])
        self.assertEqual(p.returncode, 0, p.stdout[-3000:] + p.stderr[-3000:])
        self.assertEqual([(r["gpus"], r["experts"], r["precision"]) for r in records], [(1, 64, "bf16")])


if __name__ == "__main__":
    unittest.main()
