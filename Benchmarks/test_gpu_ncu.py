"""scripts/gpu-ncu with stand-in flashmoe and ncu: each case profiles the fifth launch of a bench with the clocks
left alone, writes its report where it says, and summary.txt keeps the details-page lines that say what bounds it;
a failing case is counted."""

import os
import shutil
import tempfile
import textwrap
import unittest

import stand_in

# Records its arguments; a profiling run (fails for the preset "broken") writes its report and prints no results,
# as ncu does with --export; --import prints the report's details page.
FAKE_NCU = textwrap.dedent("""\
    #!/usr/bin/env bash
    echo "$*" >>"$(dirname "$0")/ncu-args"
    case "$*" in *"--preset broken"*) echo "==ERROR== failed"; exit 1 ;; esac
    if [ "$1" != --import ]; then
        while [ "$1" != --export ]; do shift; done
        echo "report" >"$2.ncu-rep"; echo "==PROF== Report: $2.ncu-rep"; exit 0
    fi
    cat <<'PAGE'
      Section: GPU Speed Of Light Throughput
        Memory Throughput                 %        71.20
        DRAM Throughput                   %        68.05
        Duration                         us        66.43
        Compute (SM) Throughput           %        12.11
        Block Limit Registers         block            1
      Section: Warp State Statistics
        Warp Cycles Per Issued Instruction  cycle  41.2
    PAGE
    """)


class GpuNcuTests(unittest.TestCase):
    def run_ncu(self, *args, nvcc=None):
        """gpu-ncu ARGS with the stand-in ncu (and nvcc: the text of a stand-in, or none on PATH); returns the
        process, OUTPUT_DIR and every argument list ncu got."""
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp, True)
        tools = {"NCU": FAKE_NCU, "NVCC": nvcc}
        env = {"NVCC": "/nonexistent/nvcc"}
        for name, text in tools.items():
            if text is None:
                continue
            env[name] = os.path.join(tmp, name.lower())
            with open(env[name], "w") as f:
                f.write(text)
            os.chmod(env[name], 0o755)
        p, out = stand_in.run_script(self, "gpu-ncu", "#!/bin/sh\nexit 0\n", args, env)
        log = os.path.join(tmp, "ncu-args")
        return p, out, stand_in.read(log) if os.path.exists(log) else ""

    def test_profiles_the_fifth_launch_and_keeps_the_bounding_lines(self):
        p, out, seen = self.run_ncu("--case", "qwen3-30b-a3b 1 bf16")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("--clock-control none --kernel-name fmoe_forward --launch-skip 4 --launch-count 1", seen)
        self.assertIn(f"--export {out}/ncu-qwen3-30b-a3b-1-bf16", seen)
        self.assertIn("bench --backend cuda --preset qwen3-30b-a3b --tokens 1 --precision bf16 --iterations 1 "
                      "--warmup 3", seen)
        self.assertIn(f"--import {out}/ncu-qwen3-30b-a3b-1-bf16.ncu-rep --page details", seen)
        summary = stand_in.read(os.path.join(out, "summary.txt"))
        self.assertIn("qwen3-30b-a3b S=1 bf16: ncu exit 0", summary)
        self.assertIn(" DRAM Throughput % 68.05", summary)
        self.assertIn(" Warp Cycles Per Issued Instruction cycle 41.2", summary)
        self.assertNotIn("Block Limit", summary)
        self.assertIn("stream_bench: skipped (/nonexistent/nvcc is not on PATH)", summary)
        self.assertIn("l2_feed_bench: skipped (/nonexistent/nvcc is not on PATH)", summary)
        self.assertIn("gpu-ncu: 0 step(s) failed", summary)

    def test_default_cases_and_a_failing_case(self):
        p, out, seen = self.run_ncu("--case", "broken 1 bf16", "--case", "paper-e64 1 bf16")
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertIn("broken S=1 bf16: ncu exit 1", stand_in.read(os.path.join(out, "summary.txt")))
        p, out, seen = self.run_ncu()
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertEqual(seen.count("--launch-skip 4"), 3)

    def test_the_stream_and_l2_benches_run_first_when_nvcc_is_there(self):
        nvcc = ('#!/bin/sh\nwhile [ "$1" != -o ]; do shift; done\n'  # writes a program that prints one rate
                'printf \'#!/bin/sh\\necho "contiguous U=4: 4100 GB/s"\\n\' >"$2"; chmod +x "$2"\n')
        p, out, _ = self.run_ncu("--case", "paper-e64 1 bf16", nvcc=nvcc)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        summary = stand_in.read(os.path.join(out, "summary.txt"))
        self.assertLess(summary.index("contiguous U=4: 4100 GB/s"), summary.index("paper-e64 S=1 bf16"))
        self.assertLess(summary.index("stream_bench: exit 0"), summary.index("l2_feed_bench: exit 0"))
        self.assertLess(summary.index("l2_feed_bench: exit 0"), summary.index("paper-e64 S=1 bf16"))
        for bench in ("stream_bench", "l2_feed_bench"):  # only their output is kept
            self.assertFalse(os.path.exists(os.path.join(out, bench)))

    def test_usage(self):
        stand_in.check_usage(self, "gpu-ncu", "--clock-control none")


if __name__ == "__main__":
    unittest.main()
