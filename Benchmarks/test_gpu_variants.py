"""scripts/gpu-variants with a stand-in flashmoe binary: each variant's commands see their own copy of the kernel
sources with the one default it sets, the caller's FLASHMOE_KERNEL_DIR never leaks in, a macro that is not in the
named file is a usage error before anything runs, a variant's environment reaches its commands only, and failures are
counted and named, --pack leaves the logs in one archive, and a patch variant runs the patched sources (a patch that
does not apply is a usage error)."""

import difflib
import os
import shutil
import tarfile
import tempfile
import textwrap
import unittest

import stand_in

# A bench prints a median naming the FMOE_GATE_GEMV default of its kernel folder ("9.99" without one); the
# preset "broken" fails.
FAKE = textwrap.dedent("""\
    #!/usr/bin/env bash
    g=none
    [ -n "${FLASHMOE_KERNEL_DIR:-}" ] && g=$(sed -n 's/^#define FMOE_GATE_GEMV \\([0-9]\\)$/\\1/p' "$FLASHMOE_KERNEL_DIR/gate_gemv.cuh")
    [ "$1" = bench ] || exit 3
    [ "$5" = broken ] && exit 5
    [ "$g" = none ] && echo "median 9.99 ms" || echo "median 0.${g}5 ms"
    echo "tma=${FLASHMOE_TMA:-unset}"
    [ "$g" = none ] || echo "ring $(sed -n 's/^#define FMOE_DECODE_RING \\([0-9]\\)$/\\1/p' "$FLASHMOE_KERNEL_DIR/phase_experts.cuh")"
    prev=''; for a in "$@"; do [ "$prev" = --trace ] && echo '{}' >"$a"; prev=$a; done
    echo "timeline: 3 events over 1 blocks"
    """)


class GpuVariantsTests(unittest.TestCase):
    def run_script(self, *args):
        return stand_in.run_script(self, "gpu-variants", FAKE, args)

    def test_each_variant_runs_its_own_kernels_next_to_the_base(self):
        p, out = self.run_script(
            "--variant", "off=gate_gemv.cuh:FMOE_GATE_GEMV=0", "--variant", "on=gate_gemv.cuh:FMOE_GATE_GEMV=1",
            "--base", "BASE", "--case", "qwen3-30b-a3b 1 bf16", "--case", "paper-e64 8 fp8",
            "--trace", "qwen3-30b-a3b 1 bf16 on")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        summary = stand_in.read(os.path.join(out, "summary.txt"))
        self.assertIn("qwen3-30b-a3b S=1 bf16: off median 0.05 ms; on median 0.15 ms; base median 9.99 ms;", summary)
        self.assertIn("paper-e64 S=8 fp8: off median 0.05 ms;", summary)
        self.assertIn("trace qwen3-30b-a3b S=1 bf16 (on):", summary)
        self.assertTrue(os.path.exists(os.path.join(out, "trace-qwen3-30b-a3b-1-bf16-on.json")))
        self.assertIn("gpu-variants: 0 command(s) failed", summary)

    def test_a_variant_may_set_several_defaults(self):
        p, out = self.run_script(
            "--variant", "both=gate_gemv.cuh:FMOE_GATE_GEMV=0+phase_experts.cuh:FMOE_DECODE_RING=0",
            "--variant", "one=gate_gemv.cuh:FMOE_GATE_GEMV=0", "--case", "qwen3-30b-a3b 1 bf16")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("both median 0.05 ms; one median 0.05 ms;", stand_in.read(os.path.join(out, "summary.txt")))
        self.assertIn("ring 0", stand_in.read(os.path.join(out, "bench-qwen3-30b-a3b-1-bf16-both.log")))
        self.assertIn("ring 1", stand_in.read(os.path.join(out, "bench-qwen3-30b-a3b-1-bf16-one.log")))
        p, out = self.run_script("--variant", "x=gate_gemv.cuh:FMOE_GATE_GEMV=0+gemv.cuh:FMOE_NO_SUCH=1",
                                 "--case", "qwen3-30b-a3b 1 bf16")
        self.assertEqual(p.returncode, 2)
        self.assertIn("FMOE_NO_SUCH", p.stderr)

    def test_a_variant_env_reaches_only_that_variants_commands(self):
        p, out = self.run_script(
            "--variant", "cp=gate_gemv.cuh:FMOE_GATE_GEMV=1", "--variant", "tma=gate_gemv.cuh:FMOE_GATE_GEMV=1",
            "--variant-env", "tma=FLASHMOE_TMA=1", "--case", "qwen3-30b-a3b 4096 bf16",
            "--trace", "qwen3-30b-a3b 4096 bf16 tma")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("tma=unset", stand_in.read(os.path.join(out, "bench-qwen3-30b-a3b-4096-bf16-cp.log")))
        self.assertIn("tma=1", stand_in.read(os.path.join(out, "bench-qwen3-30b-a3b-4096-bf16-tma.log")))
        self.assertIn("tma=1", stand_in.read(os.path.join(out, "trace-qwen3-30b-a3b-4096-bf16-tma.log")))
        p, out = self.run_script("--variant", "cp=gate_gemv.cuh:FMOE_GATE_GEMV=1", "--variant-env", "tmx=FLASHMOE_TMA=1",
                                 "--case", "qwen3-30b-a3b 4096 bf16")
        self.assertEqual(p.returncode, 2)
        self.assertIn("--variant-env tmx", p.stderr)

    def test_a_failing_bench_is_counted_and_named(self):
        p, out = self.run_script("--variant", "on=gate_gemv.cuh:FMOE_GATE_GEMV=1", "--case", "broken 1 bf16")
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertIn("bench-broken-1-bf16-on.log: exit 5", stand_in.read(os.path.join(out, "failures.txt")))
        self.assertIn("(no median: see bench-broken-1-bf16-on.log)", stand_in.read(os.path.join(out, "summary.txt")))

    def test_pack_puts_the_logs_in_one_archive(self):
        p, out = self.run_script(
            "--pack", "--variant", "off=gate_gemv.cuh:FMOE_GATE_GEMV=0",
            "--variant", "on=gate_gemv.cuh:FMOE_GATE_GEMV=1",
            "--case", "qwen3-30b-a3b 1 bf16", "--case", "broken 1 bf16", "--trace", "qwen3-30b-a3b 1 bf16 on")
        self.assertEqual(p.returncode, 2, p.stdout + p.stderr)  # the two broken benches
        self.assertEqual(sorted(os.listdir(out)),
                         ["failures.txt", "logs.tgz", "summary.txt", "trace-qwen3-30b-a3b-1-bf16-on.json"])
        summary = stand_in.read(os.path.join(out, "summary.txt"))
        self.assertIn("qwen3-30b-a3b S=1 bf16: off median 0.05 ms; on median 0.15 ms;", summary)
        self.assertIn("trace qwen3-30b-a3b S=1 bf16 (on):", summary)
        with tarfile.open(os.path.join(out, "logs.tgz")) as t:
            names = {os.path.basename(n) for n in t.getnames()}
            self.assertIn("bench-qwen3-30b-a3b-1-bf16-on.log", names)
            self.assertIn("bench-broken-1-bf16-off.log", names)
            self.assertIn("trace-qwen3-30b-a3b-1-bf16-on.log", names)
            off = next(m for m in t.getmembers() if m.name.endswith("bench-qwen3-30b-a3b-1-bf16-off.log"))
            self.assertIn("median 0.05 ms", t.extractfile(off).read().decode())

    def write_patch(self, old, new):
        """A unified diff of gate_gemv.cuh (paths a/, b/) replacing the line `old` by `new`, in a temporary file."""
        path = os.path.join(stand_in.ROOT, "Sources", "CKernels", "kernels", "gate_gemv.cuh")
        lines = stand_in.read(path).splitlines(keepends=True)
        self.assertIn(old, lines)
        changed = [new if line == old else line for line in lines]
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp, True)
        patch = os.path.join(tmp, "gemv.patch")
        with open(patch, "w") as f:
            f.writelines(difflib.unified_diff(lines, changed, "a/gate_gemv.cuh", "b/gate_gemv.cuh"))
        return patch

    @unittest.skipUnless(shutil.which("patch"), "no 'patch' command on this machine")
    def test_a_patch_variant_runs_the_patched_sources(self):
        patch = self.write_patch("#define FMOE_GATE_GEMV 1\n", "#define FMOE_GATE_GEMV 0\n")
        p, out = self.run_script("--variant-patch", "p=" + patch, "--variant", "on=gate_gemv.cuh:FMOE_GATE_GEMV=1",
                                 "--case", "qwen3-30b-a3b 1 bf16")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("qwen3-30b-a3b S=1 bf16: on median 0.15 ms; p median 0.05 ms;",
                      stand_in.read(os.path.join(out, "summary.txt")))
        # A patch whose context is not in the sources is refused before anything runs.
        stale = self.write_patch("#define FMOE_GATE_GEMV 1\n", "#define FMOE_GATE_GEMV 0\n")
        with open(stale) as f:
            text = f.read().replace("-#define FMOE_GATE_GEMV 1", "-#define FMOE_NO_SUCH 1")
        with open(stale, "w") as f:
            f.write(text)
        p, out = self.run_script("--variant-patch", "p=" + patch + "+" + stale, "--case", "qwen3-30b-a3b 1 bf16")
        self.assertEqual(p.returncode, 2)
        self.assertIn("does not apply", p.stderr)
        self.assertFalse(os.path.exists(os.path.join(out, "summary.txt")))

    def test_a_macro_missing_from_its_file_is_a_usage_error(self):
        p, out = self.run_script("--variant", "x=gemv.cuh:FMOE_NO_SUCH=1", "--case", "qwen3-30b-a3b 1 bf16")
        self.assertEqual(p.returncode, 2)
        self.assertIn("FMOE_NO_SUCH", p.stderr)
        self.assertFalse(os.path.exists(os.path.join(out, "summary.txt")))

    def test_power_summarises_the_busy_samples_of_each_bench(self):
        # A stand-in nvidia-smi: two idle samples (the compile), then three busy ones, two of them power-capped.
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp, True)
        smi = os.path.join(tmp, "nvidia-smi")
        with open(smi, "w") as f:
            f.write(textwrap.dedent("""\
                #!/usr/bin/env bash
                case "$*" in *-lms*) ;; *) exit 0 ;; esac
                printf '0, 1980, 70.1, 0x0000000000000000\\n3, 1980, 90.0, 0x0000000000000000\\n'
                printf '100, 1500, 699.5, 0x0000000000000004\\n95, 1400, 701.0, 0x000000000000000C\\n'
                printf '100, 1700, 650.0, 0x0000000000000001\\n'
                sleep 30
                """))
        os.chmod(smi, 0o755)
        p, out = stand_in.run_script(self, "gpu-variants", FAKE,
                                     ("--power", "--iterations", "400", "--variant", "on=gate_gemv.cuh:FMOE_GATE_GEMV=1",
                                      "--case", "qwen3-30b-a3b 1 bf16"), {"NVIDIA_SMI": smi})
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("on median 0.15 ms (3 samples: 1500 MHz, 699 W, power cap 66 %);",
                      stand_in.read(os.path.join(out, "summary.txt")))
        self.assertIn("--iterations 400", stand_in.read(os.path.join(out, "bench-qwen3-30b-a3b-1-bf16-on.log")))
        self.assertTrue(os.path.exists(os.path.join(out, "power-qwen3-30b-a3b-1-bf16-on.csv")))
        p, out = self.run_script("--iterations", "0", "--variant", "on=gate_gemv.cuh:FMOE_GATE_GEMV=1",
                                 "--case", "qwen3-30b-a3b 1 bf16")
        self.assertEqual(p.returncode, 2)
        self.assertIn("--iterations 0", p.stderr)

    def test_usage(self):
        stand_in.check_usage(self, "gpu-variants", "--variant")


if __name__ == "__main__":
    unittest.main()
