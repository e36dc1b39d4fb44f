"""Runs a scripts/gpu-* script against stand-in flashmoe binaries (shell scripts), for the script tests."""

import os
import shutil
import stat
import subprocess
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(test, script, fake, args, env_extra=None):
    """Runs scripts/<script> OUT ARGS with FLASHMOE_BIN and a second binary ("BASE" in ARGS) both the stand-in
    `fake` (a script's text), a FLASHMOE_KERNEL_DIR that must not leak in, and a temporary folder `test` removes.
    Returns (the finished process, OUT)."""
    tmp = tempfile.mkdtemp()
    test.addCleanup(shutil.rmtree, tmp, True)
    for name in ("fake", "base"):
        path = os.path.join(tmp, name)
        with open(path, "w") as f:
            f.write(fake)
        os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
    env = dict(os.environ, FLASHMOE_BIN=os.path.join(tmp, "fake"), FLASHMOE_KERNEL_DIR="/nonexistent", TMPDIR=tmp,
               **(env_extra or {}))
    out = os.path.join(tmp, "out")
    args = [a.replace("BASE", os.path.join(tmp, "base")) for a in args]
    p = subprocess.run([os.path.join(ROOT, "scripts", script), out, *args], env=env, capture_output=True, text=True,
                       timeout=120)
    return p, out


def check_usage(test, script, help_text):
    """No arguments: exit 2 with a usage line; --help: exit 0 with `help_text` in it."""
    path = os.path.join(ROOT, "scripts", script)
    p = subprocess.run([path], capture_output=True, text=True)
    test.assertEqual(p.returncode, 2)
    test.assertIn("usage", p.stderr)
    p = subprocess.run([path, "--help"], capture_output=True, text=True)
    test.assertEqual(p.returncode, 0)
    test.assertIn(help_text, p.stdout)


def read(path):
    with open(path) as f:
        return f.read()
