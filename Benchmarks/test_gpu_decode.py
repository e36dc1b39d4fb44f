"""scripts/gpu-decode with a stand-in flashmoe binary: each variant's commands see only their own copy of the kernel
sources (FMOE_GEMV 0, 1 or 2), nothing leaks from the caller's FLASHMOE_KERNEL_DIR, and summary.txt gets one line
per case with every variant's median."""

import os
import textwrap
import unittest

import stand_in

# Prints a median that names the FMOE_GEMV default of the kernel folder it was given ("none" without one).
FAKE = textwrap.dedent("""\
    #!/usr/bin/env bash
    g=none
    [ -n "${FLASHMOE_KERNEL_DIR:-}" ] && g=$(sed -n 's/^#define FMOE_GEMV \\([0-9]\\)$/\\1/p' "$FLASHMOE_KERNEL_DIR/gemv.cuh")
    case "$1" in
    bench) [ "$g" = none ] && echo "median 9.99 ms" || echo "median 0.${g}5 ms"
           prev=''; for a in "$@"; do [ "$prev" = --trace ] && echo '{}' >"$a"; prev=$a; done
           echo "timeline: 3 events over 1 blocks"; echo "  gate: 1 x 1.0 us" ;;
    verify) [ "${FAKE_FAIL:-}" = verify ] && exit 4; echo "all 3 cases passed" ;;
    *) exit 3 ;;
    esac
    """)


class GpuDecodeTests(unittest.TestCase):
    def run_script(self, *args, env_extra=None):
        return stand_in.run_script(self, "gpu-decode", FAKE, args, env_extra)

    def test_variants_see_their_own_kernels_and_the_summary_has_every_case(self):
        p, out = self.run_script("--quick", "--base", "BASE")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        summary = stand_in.read(os.path.join(out, "summary.txt"))
        self.assertIn("qwen3-30b-a3b S=1 bf16: gemv0 median 0.05 ms; gemv2 median 0.25 ms; base median 9.99 ms;",
                      summary)
        self.assertIn("qwen3-30b-a3b S=64 fp8: gemv0 median 0.05 ms; gemv1 median 0.15 ms; base median 9.99 ms;",
                      summary)
        self.assertEqual(summary.count(" S="), 6 + 2)  # six cases and two traces (--quick)
        self.assertIn("verify decode GEMV: all 3 cases passed", summary)
        self.assertIn("gpu-decode: 0 command(s) failed", summary)
        self.assertTrue(os.path.exists(os.path.join(out, "fp8", "trace-qwen3-30b-a3b-1-fp8-gemv1.json")))
        self.assertTrue(os.path.exists(os.path.join(out, "bf16", "trace-qwen3-30b-a3b-1-bf16-gemv0.json")))

    def test_a_failing_command_is_counted_and_named(self):
        p, out = self.run_script("--quick", env_extra={"FAKE_FAIL": "verify"})
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertIn("verify-decode: exit 4", stand_in.read(os.path.join(out, "failures.txt")))
        self.assertIn("gpu-decode: 1 command(s) failed", stand_in.read(os.path.join(out, "summary.txt")))

    def test_a_bad_base_is_a_usage_error_before_any_step(self):
        p, out = self.run_script("--base", "/nonexistent/flashmoe")
        self.assertEqual(p.returncode, 2)
        self.assertIn("--base", p.stderr)
        self.assertFalse(os.path.exists(os.path.join(out, "summary.txt")))

    def test_usage(self):
        stand_in.check_usage(self, "gpu-decode", "FMOE_GEMV")


if __name__ == "__main__":
    unittest.main()
