"""Tests of the GPU-run tooling without a GPU: merge_json.py, record_results.py, the torch baseline's case plan,
check_transformers.py's command line, and scripts/gpu-run itself in --dry-run mode (with the stand-in tools of
scripts/gpu_run_fake.py, including failures, hangs, a tight budget and a signal):

    python3 -m unittest discover -s Benchmarks -p 'test_*.py'
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import unittest
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import check_transformers  # noqa: E402  (imports torch only inside its functions)
import merge_json  # noqa: E402
import record_results  # noqa: E402
import torch_moe_baseline as tmb  # noqa: E402

GPU_RUN = os.path.join(ROOT, "scripts", "gpu-run")
FAKE = os.path.join(ROOT, "scripts", "gpu_run_fake.py")
FULL_CASES = {("paper-e64", 8192, "bf16"), ("paper-e64", 8192, "tf32"), ("paper-e32", 8192, "bf16"),
              ("paper-e32", 8192, "tf32"), ("qwen3-30b-a3b", 4096, "bf16"), ("qwen3-30b-a3b", 4096, "tf32"),
              ("qwen3-30b-a3b", 64, "bf16"), ("mixtral-8x7b", 4096, "bf16"), ("deepseek-v3", 4096, "bf16"),
              ("deepseek-v3", 64, "bf16")}
OUTPUT_FILES = {"summary.txt", "logs.tgz", "flashmoe.json", "torch.json", "compare.md"}


class TempDirTest(unittest.TestCase):
    def tmp(self) -> str:
        d = tempfile.mkdtemp(prefix="gpu-tooling-test-")
        self.addCleanup(shutil.rmtree, d, True)
        return d

    def write(self, folder: str, name: str, data) -> str:
        path = os.path.join(folder, name)
        with open(path, "w") as f:
            f.write(data if isinstance(data, str) else json.dumps(data))
        return path


class MergeJsonTests(TempDirTest):
    def test_merges_lists_and_objects_in_order_and_leaves_out_bad_files(self):
        d = self.tmp()
        a = self.write(d, "a.json", [{"preset": "a"}, {"preset": "b"}])
        b = self.write(d, "b.json", {"preset": "c"})
        empty = self.write(d, "empty.json", "")
        broken = self.write(d, "broken.json", "[{")
        wrong = self.write(d, "wrong.json", [1, 2])
        warnings: list[str] = []
        out = merge_json.merge([a, empty, b, broken, os.path.join(d, "missing.json"), wrong], warnings.append)
        self.assertEqual([e["preset"] for e in out], ["a", "b", "c"])
        self.assertEqual(len(warnings), 4)
        for w, what in zip(warnings, ("empty", "not JSON", "cannot read", "neither")):
            self.assertIn(what, w)

    def test_cli_writes_a_list_even_from_nothing(self):
        d = self.tmp()
        out = os.path.join(d, "out.json")
        with contextlib.redirect_stdout(io.StringIO()):
            self.assertEqual(merge_json.main([out]), 0)
        with open(out) as f:
            self.assertEqual(json.load(f), [])
        self.assertEqual(os.listdir(d), ["out.json"])  # no temporary file left behind
        with contextlib.redirect_stderr(io.StringIO()) as err:
            self.assertEqual(merge_json.main([os.path.join(d, "no-such-dir", "x.json")]), 2)
        self.assertIn("cannot write", err.getvalue())


class TorchPlanTests(unittest.TestCase):
    def test_skipping_a_whole_precision_skips_its_check_too(self):
        a = tmb.parse_args(["--check", "--precisions", "tf32,bf16", "--skip", "deepseek-v3::tf32"])
        self.assertEqual(tmb.plan_case(a, "deepseek-v3", "tf32"),
                         ([], False, ["deepseek-v3:loop:tf32 (--skip)"]))
        self.assertEqual(tmb.plan_case(a, "deepseek-v3", "bf16"), (["loop", "grouped"], True, []))
        self.assertEqual(tmb.plan_case(a, "paper-e32", "tf32"), (["loop"], True, []))

    def test_partial_skip_and_check_only_precision(self):
        a = tmb.parse_args(["--check", "--precisions", "tf32", "--skip", "paper-e32:loop:bf16"])
        # bf16 is not timed but --check builds it for grouped's check; nothing of it is timed.
        self.assertEqual(tmb.plan_case(a, "paper-e32", "bf16"), ([], True, []))
        b = tmb.parse_args(["--check", "--skip", "paper-e32:loop:bf16"])
        self.assertEqual(tmb.plan_case(b, "paper-e32", "bf16"), (["grouped"], True, ["paper-e32:loop:bf16 (--skip)"]))
        c = tmb.parse_args(["--precisions", "bf16"])
        self.assertEqual(tmb.plan_case(c, "paper-e32", "bf16"), (["loop", "grouped"], False, []))


class CheckTransformersArgsTests(unittest.TestCase):
    def test_backends_include_cuda_and_reject_unknown_names(self):
        a = check_transformers.parse_args(["bin/flashmoe", "--backends", "cpu,oracle,cuda,cpu"])
        self.assertEqual(a.backends, ["cpu", "oracle", "cuda"])
        self.assertEqual(a.families, list(check_transformers.FAMILIES))
        for argv in (["b", "--backends", "gpu"], ["b", "--backends", ","], ["b", "--families", "llama"]):
            with self.subTest(argv=argv), contextlib.redirect_stderr(io.StringIO()):
                with self.assertRaises(SystemExit):
                    check_transformers.parse_args(argv)


def synthetic_run(folder: str, *, fake: bool = False, packed: bool = True) -> None:
    """A gpu-run OUTPUT_DIR with made-up but well-formed contents."""
    fm = [{"backend": "cuda", "preset": "paper-e64", "tokens": 8192, "precision": "bf16", "median_ms": 1.25,
           "min_ms": 1.2, "tflops": 450.0, "floor_ms": 0.5, "workspace_bytes": 3 << 20,
           "date": "2031-02-03T04:05:06Z", "device": "Test GPU 9000", "method": "CUDA events"},
          {"backend": "cuda", "preset": "deepseek-v3", "tokens": 64, "precision": "bf16", "median_ms": 9.0,
           "min_ms": 8.5, "tflops": 2.0, "floor_ms": 6.0, "date": "2031-02-03T04:09:00Z", "device": "Test GPU 9000"}]
    if fake:
        fm[0]["fake"] = True
    rates = {"bf16_tflops": 701.2, "tf32_tflops": 351.0, "fp32_tflops": 51.0, "copy_gbps": 3999.0}
    torch = [{"preset": "paper-e64", "tokens": 8192, "impl": "grouped", "precision": "bf16", "median_ms": 2.5,
              "min_ms": 2.4, "tflops": 225.0, "floor_ms": 0.45, "rates": rates},
             {"preset": "paper-e64", "tokens": 8192, "impl": "loop", "precision": "bf16", "median_ms": 5.0,
              "min_ms": 4.9, "tflops": 112.0, "floor_ms": 0.45, "rates": rates}]
    with open(os.path.join(folder, "flashmoe.json"), "w") as f:
        json.dump(fm, f)
    with open(os.path.join(folder, "torch.json"), "w") as f:
        json.dump(torch, f)
    logs = {
        "verify.log": "$ bin/flashmoe verify\ndevice 0: Test GPU 9000, 132 SMs, sm_90a\nresult case ...\n"
                      "PASS  paper-e64   bf16 ...\nFAIL  E = 1 | odd   fp32 ...  ← rel. error too large\n"
                      "PASS bounded wait: typed error after 203 ms\n1 FAILED\n# exit 1 after 90 s: FAIL\n",
        "transformers.log": "$ python3 scripts/check_transformers.py bin/flashmoe --backends cpu,oracle,cuda\n"
                            "mixtral      state_dict       cuda     fused   1.00e-03  1.00e-03  token 3  FAIL\n"
                            "\n27 passed, 1 failed (tolerance 1e-05); files in /tmp/x\n",
        "memcheck.log": "$ /cuda/compute-sanitizer --tool memcheck --error-exitcode 99 /x/bin/flashmoe run "
                        "--preset paper-e32 --experts 8\n========= COMPUTE-SANITIZER\n"
                        "========= ERROR SUMMARY: 0 errors\n# exit 0 after 20 s: PASS\n",
        "racecheck.log": "$ /cuda/compute-sanitizer --tool racecheck --error-exitcode 99 /x/bin/flashmoe run "
                         "--preset paper-e32\n========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 2 warnings)"
                         "\n========= ERROR SUMMARY: 0 errors\n",
        "env.log": "$ gpu-run --env-report\ndate: 2031-02-03T04:00:00Z\ntorch 2.11.0, CUDA 13.0, Test GPU 9000\n"
                   "transformers 5.17.0\ncompute-sanitizer: Version 2025.3\n",
        "nvidia-smi.log": "| NVIDIA-SMI 580.1   Driver Version: 580.1   CUDA Version: 13.0 |\n",
        "steps.tsv": "verify\tFAIL\t90\t1\texit 1: 1 FAILED\nmemcheck\tPASS\t20\t0\t\nracecheck\tTIMEOUT\t180\t124\t"
                     "stopped | late\ntorch\tPASS\t100\t0\t\n",
    }
    if packed:
        with tarfile.open(os.path.join(folder, "logs.tgz"), "w:gz") as tar:
            for name, text in logs.items():
                data = text.encode()
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    else:
        os.makedirs(os.path.join(folder, "logs"))
        for name, text in logs.items():
            with open(os.path.join(folder, "logs", name), "w") as f:
                f.write(text)


class RecordResultsTests(TempDirTest):
    def record(self, argv: list[str]) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = record_results.main(argv)
        return rc, out.getvalue(), err.getvalue()

    def test_section_from_a_packed_run(self):
        d = self.tmp()
        synthetic_run(d)
        rc, text, err = self.record([d, "--commit", "abc1234"])
        self.assertEqual(rc, 0, err)
        lines = text.splitlines()
        self.assertEqual(lines[0], "## GPU run of 2031-02-03: Test GPU 9000, commit abc1234")  # from the run
        self.assertIn("| paper-e64 | 8192 | bf16 | 1.250 | 5.000 | 2.500 | 2.00× | 0.500 |", lines)
        self.assertIn("| deepseek-v3 | 64 | bf16 | 9.000 | – | – | – | 6.000 |", lines)
        self.assertIn("| paper-e64 | 8192 | bf16 | 1.250 | 1.200 | 450.0 | 0.500 | 2.50× | 3.0 |", lines)
        loop = lines.index("| paper-e64 | 8192 | loop | bf16 | 5.000 | 4.900 | 112.0 | 0.450 | 11.11× |")
        grouped = lines.index("| paper-e64 | 8192 | grouped | bf16 | 2.500 | 2.400 | 225.0 | 0.450 | 5.56× |")
        self.assertLess(loop, grouped)
        self.assertIn("Device ceilings measured by torch_moe_baseline.py: bf16 matmul 701 TFLOP/s, TF32 matmul 351 "
                      "TFLOP/s, fp32 matmul 51 TFLOP/s, copy 3999 GB/s (read + write).", lines)
        self.assertIn("- `flashmoe verify`: 1 FAILED (1 of 2 case rows PASS).", lines)
        self.assertIn("- Bounded wait: PASS bounded wait: typed error after 203 ms", lines)
        self.assertIn("FAIL  E = 1 | odd   fp32 ...  ← rel. error too large", lines)  # quoted in a code block
        self.assertIn("- `check_transformers.py` (backends cpu,oracle,cuda, fp32, against transformers' own MoE "
                      "blocks): 27 passed, 1 failed (tolerance 1e-05)", lines)
        self.assertIn("| memcheck | memcheck | `run --preset paper-e32 --experts 8` | ERROR SUMMARY: 0 errors | "
                      "PASS (exit 0) |", lines)
        self.assertIn("| racecheck | racecheck | `run --preset paper-e32` | RACECHECK SUMMARY: 0 hazards displayed (0 "
                      "errors, 2 warnings); ERROR SUMMARY: 0 errors | TIMEOUT (exit 124) |", lines)
        self.assertIn("| racecheck | TIMEOUT | 180 | stopped \\| late |", lines)  # a '|' in a cell is escaped
        self.assertIn("Steps: 2 of 4 steps passed", text)
        self.assertIn("driver 580.1 (CUDA 13.0)", text)
        self.assertIn("torch 2.11.0, CUDA 13.0, Test GPU 9000", text)
        self.assertNotIn("memcheck-gated", text)  # no log, no row

    def test_unpacked_logs_explicit_date_and_append(self):
        d = self.tmp()
        synthetic_run(d, packed=False)
        results = self.write(d, "RESULTS.md", "# Results\n")
        rc, text, err = self.record([d, "--commit", "abc1234", "--date", "2031-12-31", "--gpu", "NVIDIA H200",
                                     "--append", results])
        self.assertEqual(rc, 0, err)
        self.assertIn("appended", text)
        with open(results) as f:
            body = f.read()
        self.assertTrue(body.startswith("# Results\n\n## GPU run of 2031-12-31: NVIDIA H200, commit abc1234\n"))
        self.assertIn("1 FAILED", body)

    def test_refuses_fake_numbers_and_unusable_input(self):
        d = self.tmp()
        synthetic_run(d, fake=True)
        rc, _, err = self.record([d, "--commit", "abc1234"])
        self.assertEqual(rc, 2)
        self.assertIn("made-up numbers", err)
        self.assertEqual(self.record([d, "--commit", "abc1234", "--allow-fake"])[0], 0)
        empty = self.tmp()
        rc, _, err = self.record([empty, "--commit", "abc1234", "--date", "2031-01-01", "--gpu", "x"])
        self.assertEqual(rc, 2)
        self.assertIn("neither flashmoe.json nor torch.json", err)
        self.write(empty, "flashmoe.json", "{nope")
        self.assertEqual(self.record([empty, "--commit", "abc1234", "--date", "2031-01-01", "--gpu", "x"])[0], 2)
        self.write(empty, "flashmoe.json", [])
        rc, _, err = self.record([empty, "--commit", "abc1234"])
        self.assertEqual(rc, 2)
        self.assertIn("give --date and --gpu", err)
        for argv in ([d, "--commit", "not-a-sha"], [d, "--commit", "abc1234", "--date", "3 Feb"], [d]):
            with self.subTest(argv=argv), contextlib.redirect_stderr(io.StringIO()):
                with self.assertRaises(SystemExit):
                    record_results.main(argv)

    def test_torch_only_run_says_what_is_missing(self):
        d = self.tmp()
        synthetic_run(d)
        os.remove(os.path.join(d, "flashmoe.json"))
        rc, text, err = self.record([d, "--commit", "abc1234", "--date", "2031-01-01", "--gpu", "G"])
        self.assertEqual(rc, 0, err)
        self.assertIn("No FlashMoE benchmark results", text)
        self.assertIn("| paper-e64 | 8192 | bf16 | – | 5.000 | 2.500 | – | 0.450 |", text)


@unittest.skipUnless(shutil.which("bash") and shutil.which("timeout") and shutil.which("tar"),
                     "needs bash, timeout and tar")
class GpuRunDryTests(TempDirTest):
    """scripts/gpu-run with the stand-in tools: the control flow, the files it leaves, and its failure handling."""

    def run_gpu_run(self, *args: str, env: dict | None = None, timeout: float = 120):
        out = os.path.join(self.tmp(), "out")
        work = os.path.join(self.tmp(), "work")
        full_env = dict(os.environ, FLASHMOE_GPU_RUN_WORK=work, PYTHON=sys.executable, **(env or {}))
        for k in ("FAKE_GPU_FAIL", "FAKE_GPU_HANG", "FAKE_GPU_SANITIZER_ERRORS", "FAKE_GPU_NO_SUMMARY"):
            if env is None or k not in env:
                full_env.pop(k, None)
        proc = subprocess.run(["bash", GPU_RUN, out, "--dry-run", *args], env=full_env, capture_output=True,
                              text=True, timeout=timeout)
        return proc, out, work

    def steps(self, work: str) -> dict[str, list[str]]:
        with open(os.path.join(work, "steps.tsv")) as f:
            return {row[0]: row for row in (line.rstrip("\n").split("\t") for line in f)}

    def load(self, path: str):
        with open(path) as f:
            return json.load(f)

    def test_full_dry_run_passes_and_leaves_five_files(self):
        proc, out, work = self.run_gpu_run()
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        self.assertEqual(set(os.listdir(out)), OUTPUT_FILES)
        steps = self.steps(work)
        self.assertEqual(len(steps), 26)
        self.assertTrue(all(r[1] == "PASS" for r in steps.values()), steps)
        fm = self.load(os.path.join(out, "flashmoe.json"))
        self.assertEqual({(e["preset"], e["tokens"], e["precision"]) for e in fm}, FULL_CASES)
        torch = self.load(os.path.join(out, "torch.json"))
        keys = {(e["preset"], e["tokens"], e["precision"]) for e in torch}
        self.assertTrue(FULL_CASES <= keys)  # torch covers every FlashMoE case...
        self.assertFalse(any(e["precision"] == "tf32" and e["preset"] in ("mixtral-8x7b", "deepseek-v3")
                             for e in torch))  # ...but not the skipped TF32 loops
        with tarfile.open(os.path.join(out, "logs.tgz")) as tar:
            names = set(tar.getnames())
        self.assertTrue({f"{s}.log" for s in steps} <= names, names)
        self.assertTrue({"steps.tsv", "flashmoe.json", "torch.json"} <= names)
        self.assertTrue({f"flashmoe-{p}-{t}-{q}.json" for p, t, q in FULL_CASES} <= names)
        with open(os.path.join(out, "summary.txt")) as f:
            summary = f.read()
        self.assertIn("DRY RUN", summary)
        self.assertIn("all 26 steps passed", summary)
        self.assertIn("racecheck: RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings);ERROR SUMMARY: 0 "
                      "errors", summary)
        with open(os.path.join(out, "compare.md")) as f:
            self.assertIn(f.read().strip(), summary)
        self.assertIn("all 26 steps passed", proc.stdout[-4000:])  # the summary is printed last
        # The per-step logs say what ran: e.g. the racecheck command and the bench flags.
        with open(os.path.join(work, "racecheck.log")) as f:
            first = f.readline()
        self.assertIn("compute-sanitizer --tool racecheck --error-exitcode 99", first)
        self.assertIn("run --preset paper-e32 --experts 8 --hidden 256 --intermediate 256 --tokens 300", first)
        with open(os.path.join(work, "bench-deepseek-v3-64-bf16.log")) as f:
            self.assertIn("bench --backend cuda --preset deepseek-v3 --precision bf16 --tokens 64 --iterations 20",
                          f.readline())

    def test_failures_hangs_and_sanitizer_errors_do_not_stop_the_rest(self):
        proc, out, work = self.run_gpu_run(env={
            "FAKE_GPU_FAIL": "flashmoe verify;torch --check", "FAKE_GPU_HANG": "--preset mixtral-8x7b",
            "FAKE_GPU_SANITIZER_ERRORS": "--tool racecheck", "FLASHMOE_GPU_RUN_MAX_STEP": "5"})
        self.assertEqual(proc.returncode, 1, proc.stdout + proc.stderr)
        steps = self.steps(work)
        self.assertEqual(steps["verify"][1:4], ["FAIL", steps["verify"][2], "1"])
        self.assertEqual(steps["racecheck"][1], "FAIL")
        self.assertIn("ERROR SUMMARY: 2 errors", steps["racecheck"][4])
        self.assertEqual(steps["racecheck-ranks"][1], "FAIL")  # the same tool, so the same fake errors
        self.assertEqual(steps["bench-mixtral-8x7b-4096-bf16"][1], "TIMEOUT")
        self.assertEqual(steps["torch"][1], "FAIL")
        passed = [n for n, r in steps.items() if r[1] == "PASS"]
        self.assertEqual(len(passed), 26 - 5)
        self.assertEqual(len(self.load(os.path.join(out, "flashmoe.json"))), 9)
        self.assertFalse(os.path.exists(os.path.join(out, "torch.json")))
        with open(os.path.join(out, "compare.md")) as f:
            table = f.read()
        self.assertIn("| paper-e64 | 8192 | bf16 |", table)  # FlashMoE's numbers still tabled, torch's as –
        with open(os.path.join(out, "summary.txt")) as f:
            summary = f.read()
        self.assertIn("NOT PASSED: verify, racecheck, racecheck-ranks, bench-mixtral-8x7b-4096-bf16, torch", summary)

    def test_exit_zero_without_the_expected_log_line_fails(self):
        proc, _, work = self.run_gpu_run("--quick", env={"FAKE_GPU_NO_SUMMARY": "--tool memcheck"})
        self.assertEqual(proc.returncode, 1)
        row = self.steps(work)["memcheck"]
        self.assertEqual(row[1:4], ["FAIL", row[2], "0"])
        self.assertIn("log lacks a line matching 'ERROR SUMMARY: 0 errors'", row[4])

    def test_quick_serial(self):
        proc, out, work = self.run_gpu_run("--quick", "--serial")
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        steps = self.steps(work)
        self.assertEqual(list(steps), ["env", "nvidia-smi", "info", "selftest", "compile", "verify", "transformers",
                                       "memcheck", "bench-paper-e32-8192-bf16", "bench-qwen3-30b-a3b-64-bf16",
                                       "torch", "compare"])
        with open(os.path.join(work, "verify.log")) as f:
            self.assertIn("verify --filter S=1", f.readline())

    def test_tight_budget_skips_what_does_not_fit(self):
        # 30 s: the setup phase may use 10 % (3 s), below the 5 s a step needs, so its steps are skipped; the rest
        # still runs within its share.
        proc, _, work = self.run_gpu_run("--budget", "30")
        self.assertEqual(proc.returncode, 1)
        steps = self.steps(work)
        for s in ("env", "nvidia-smi", "info", "selftest"):
            self.assertEqual(steps[s][1], "SKIP", steps[s])
        self.assertEqual(steps["verify"][1], "PASS")
        self.assertEqual(steps["compare"][1], "PASS")

    def test_usage_errors(self):
        d = self.tmp()
        for argv in ([], ["--budget", "abc", d], ["--budget", "5", d], ["--bogus", d], [d, d + "x"], [d, "--budget"]):
            with self.subTest(argv=argv):
                proc = subprocess.run(["bash", GPU_RUN, *argv], capture_output=True, text=True, timeout=30)
                self.assertEqual(proc.returncode, 2, proc.stderr)
                self.assertIn("error" if argv else "usage", proc.stderr)
        self.assertIn("--budget S", subprocess.run(["bash", GPU_RUN, "--help"], capture_output=True, text=True,
                                                   timeout=30).stdout)

    def test_fake_tools_refuse_what_the_real_ones_would(self):
        for argv in (["flashmoe", "bench", "--bogus", "1"], ["flashmoe", "bench", "--preset", "nope"],
                     ["flashmoe", "run", "--precision", "fp8"], ["torch", "--presets", "nope"],
                     ["transformers", "b", "--backends", "gpu"]):
            with self.subTest(argv=argv):
                proc = subprocess.run([sys.executable, FAKE, *argv], capture_output=True, text=True, timeout=30)
                self.assertNotEqual(proc.returncode, 0)

    def test_a_signal_packs_what_there_is_and_stops_the_steps(self):
        out = os.path.join(self.tmp(), "out")
        work = os.path.join(self.tmp(), "work")
        marker = uuid.uuid4().hex
        env = dict(os.environ, FLASHMOE_GPU_RUN_WORK=work, PYTHON=sys.executable, FAKE_GPU_HANG="flashmoe verify",
                   FLASHMOE_GPU_RUN_TICK="1", GPU_RUN_TEST_MARKER=marker)
        proc = subprocess.Popen(["bash", GPU_RUN, out, "--dry-run"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            # The ticker packs the hanging step's log while it runs.
            deadline = time.time() + 60
            while time.time() < deadline:
                try:
                    with tarfile.open(os.path.join(out, "logs.tgz")) as tar:
                        if "verify.log" in tar.getnames():
                            break
                except (OSError, tarfile.TarError, EOFError):
                    pass
                time.sleep(0.2)
            else:
                self.fail("logs.tgz never held verify.log")
            proc.send_signal(signal.SIGTERM)
            output, _ = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        self.assertEqual(proc.returncode, 130, output)
        with open(os.path.join(out, "summary.txt")) as f:
            summary = f.read()
        self.assertIn("INTERRUPTED", summary)
        self.assertIn("STOPPED  verify", summary)
        time.sleep(0.5)
        self.assertEqual(processes_with(marker), [], "a step outlived the signal")


def processes_with(marker: str) -> list[int]:
    """Processes whose environment holds `marker` (those a test started)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


if __name__ == "__main__":
    unittest.main()
