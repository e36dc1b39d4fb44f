"""scripts/gpu-checks with a stand-in flashmoe: --steps runs only the named steps, the others are SKIP and do not
count as failures; a named step that fails is counted; usage and help."""

import os
import unittest

import stand_in

# A flashmoe whose soak and verify pass, and whose fuzz fails (exit 1, no "0 failed" line).
FAKE = """#!/bin/sh
case "$1" in
soak) echo "soak: 5 calls, 1 shapes on 1 layers: passed" ;;
verify) echo "all 3 cases passed" ;;
fuzz) [ "$2" = --help ] && exit 0; echo "fuzz: 2 passed, 1 failed"; exit 1 ;;
info) echo "CUDA backend: stand-in" ;;
esac
exit 0
"""


class GpuChecksTests(unittest.TestCase):
    def run_checks(self, *args):
        p, out = stand_in.run_script(self, "gpu-checks", FAKE, ["--budget", "60", "--soak", "5", *args])
        return p, stand_in.read(os.path.join(out, "summary.txt"))

    def status(self, summary, step):
        """The summary's status word of `step` (PASS, FAIL, TIMEOUT or SKIP)."""
        for line in summary.splitlines():
            fields = line.split("\t")
            if len(fields) >= 2 and fields[1] == step:
                return fields[0]
        self.fail(f"no line for {step} in:\n{summary}")

    def test_only_the_named_steps_run(self):
        p, summary = self.run_checks("--steps", "soak,verify")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertEqual(self.status(summary, "soak"), "PASS")
        self.assertEqual(self.status(summary, "verify"), "PASS")
        for step in ("fuzz", "abi", "python", "procs", "memcheck-decode", "racecheck-gemv", "scale-qwen3-131072"):
            self.assertEqual(self.status(summary, step), "SKIP", step)
        self.assertIn("not in --steps", summary)
        self.assertIn("gpu-checks: 2 passed, 0 failed", summary)

    def test_a_named_step_that_fails_is_counted(self):
        p, summary = self.run_checks("--steps", "verify,fuzz")
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertEqual(self.status(summary, "fuzz"), "FAIL")
        self.assertEqual(self.status(summary, "soak"), "SKIP")

    def test_usage_and_help(self):
        stand_in.check_usage(self, "gpu-checks", "--steps: only the named steps run")


if __name__ == "__main__":
    unittest.main()
