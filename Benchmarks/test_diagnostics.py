"""The diagnostic patches of Benchmarks/diagnostics/ still apply to the kernel sources, alone and combined in the
order their README gives, and each changes what it names (an engine change that breaks one must update it)."""

import os
import shutil
import subprocess
import tempfile
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = os.path.join(ROOT, "Sources", "CKernels", "kernels")
DIAG = os.path.join(ROOT, "Benchmarks", "diagnostics")
ORDER = ["fp8-no-mma.patch", "fp8-no-loads.patch", "fp8-no-promotion.patch", "fp8-no-fence.patch"]


@unittest.skipUnless(shutil.which("patch"), "no 'patch' command on this machine")
class DiagnosticPatchTests(unittest.TestCase):
    def apply(self, names):
        """A copy of the kernels with `names` applied in order; returns its folder."""
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp, True)
        dst = os.path.join(tmp, "kernels")
        shutil.copytree(KERNELS, dst)
        for name in names:
            with open(os.path.join(DIAG, name)) as f:
                p = subprocess.run(["patch", "-p1", "--forward", "--batch", "-d", dst], stdin=f, capture_output=True,
                                   text=True)
            self.assertEqual(p.returncode, 0, f"{name} does not apply after {names}: {p.stdout}{p.stderr}")
        return dst

    def test_every_patch_in_the_folder_is_listed(self):
        self.assertEqual(sorted(n for n in os.listdir(DIAG) if n.endswith(".patch")), sorted(ORDER))

    def test_each_applies_alone_and_marks_its_change(self):
        for name in ORDER:
            with self.subTest(name):
                dst = self.apply([name])
                with open(os.path.join(dst, "tma_fp8_engine.cuh")) as f:
                    self.assertIn("DIAGNOSTIC", f.read())

    def test_the_combinations_apply(self):
        self.apply(ORDER[:2])   # no MMAs and no loads ("neither")
        self.apply(ORDER[:3])   # and no promotions ("bare")
        self.apply(ORDER)


if __name__ == "__main__":
    unittest.main()
