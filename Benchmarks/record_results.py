#!/usr/bin/env python3
"""A Benchmarks/RESULTS.md section from one `scripts/gpu-run` output folder.

    python3 Benchmarks/record_results.py OUTPUT_DIR --commit SHA [--date YYYY-MM-DD] [--gpu "NVIDIA H200"]
                                         [--append Benchmarks/RESULTS.md]

Reads OUTPUT_DIR/flashmoe.json, torch.json and the logs (inside OUTPUT_DIR/logs.tgz, or as OUTPUT_DIR/*.log or
OUTPUT_DIR/logs/*.log when unpacked) and prints a markdown section: the side-by-side table of compare.py, FlashMoE's
and torch's numbers in detail, the device ceilings torch measured, and the correctness verdicts quoted from the logs
(`flashmoe verify`, check_transformers.py, compute-sanitizer), then every step's status. Nothing is estimated: a
number is either copied from those files or computed from two of them (TFLOP/s, ratios), and what is missing shows
as `–` or is said to be missing. --date and --gpu default to what the run recorded; --append adds the section to a
file instead of printing it. Output of `gpu-run --dry-run` (entries marked "fake") is refused unless --allow-fake.
Exit status: 0, or 2 when an input is unusable.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import tarfile
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
import compare  # noqa: E402

SANITIZER_RUNS = ("memcheck", "racecheck", "memcheck-gated", "memcheck-ranks", "racecheck-ranks")


class RecordError(Exception):
    """An input that cannot be recorded; the message says what to do."""


class RunFolder:
    """One gpu-run output folder: its JSON files and its logs, wherever the logs are (tarball or plain files)."""

    def __init__(self, path: str):
        if not os.path.isdir(path):
            raise RecordError(f"{path} is not a folder (give the OUTPUT_DIR of scripts/gpu-run)")
        self.path = path
        self.logs: dict[str, str] = {}
        tgz = os.path.join(path, "logs.tgz")
        if os.path.exists(tgz):
            try:
                with tarfile.open(tgz, "r:gz") as tar:
                    for m in tar.getmembers():
                        f = tar.extractfile(m) if m.isfile() else None
                        if f is not None:
                            self.logs[os.path.basename(m.name)] = f.read().decode("utf-8", "replace")
            except (tarfile.TarError, OSError, EOFError) as e:
                raise RecordError(f"{tgz} is not a readable gzip tarball: {e}") from None
        for folder in (path, os.path.join(path, "logs")):
            if os.path.isdir(folder):
                for name in os.listdir(folder):
                    if name.endswith((".log", ".tsv")) and name not in self.logs:
                        with open(os.path.join(folder, name), errors="replace") as f:
                            self.logs[name] = f.read()

    def entries(self, name: str) -> list[dict] | None:
        """The list in OUTPUT_DIR/NAME, or None when the file is absent."""
        p = os.path.join(self.path, name)
        if not os.path.exists(p):
            return None
        try:
            return compare.load_entries(p)
        except compare.InputError as e:
            raise RecordError(str(e)) from None

    def log(self, step: str) -> str | None:
        return self.logs.get(f"{step}.log")

    def steps(self) -> list[list[str]]:
        """Rows of steps.tsv: step, status, seconds, exit status, note."""
        text = self.logs.get("steps.tsv", "")
        return [(line.split("\t") + [""] * 5)[:5] for line in text.splitlines() if line.strip()]


def find(pattern: str, text: str | None) -> str | None:
    """The last line of `text` matching `pattern`, stripped, or None."""
    if not text:
        return None
    hits = [line.strip() for line in text.splitlines() if re.search(pattern, line)]
    return hits[-1] if hits else None


def is_fake(entries: list[dict]) -> bool:
    return any(e.get("fake") or "dry run" in str(e.get("device", "")) for e in entries)


def command_of(log: str | None) -> str | None:
    """The command a gpu-run step log starts with (`$ COMMAND`)."""
    first = (log or "").splitlines()[:1]
    return first[0][2:].strip() if first and first[0].startswith("$ ") else None


def cell(text: str) -> str:
    """Text safe inside a markdown table cell (a '|' would start a new cell)."""
    return text.replace("|", "\\|")


def ratio(a, b) -> str:
    return f"{a / b:.2f}×" if a is not None and b else "–"


def flashmoe_table(entries: list[dict]) -> str:
    rows = []
    for e in sorted(entries, key=lambda e: compare.sort_key(compare.key_of(e))):
        tf = compare.tflops_of(e)
        ws = e.get("workspace_bytes")
        rows.append([str(e["preset"]), str(e["tokens"]), str(e["precision"]), benchlib.fmt_ms(e["median_ms"]),
                     benchlib.fmt_ms(e.get("min_ms")), f"{tf:.1f}" if tf is not None else "–",
                     benchlib.fmt_ms(e.get("floor_ms")), ratio(e["median_ms"], e.get("floor_ms")),
                     f"{ws / 2**20:.1f}" if ws is not None else "–"])
    headers = ["preset", "tokens", "precision", "median ms", "min ms", "TFLOP/s", "floor ms", "× floor",
               "workspace MiB"]
    return benchlib.markdown_table(headers, rows, align_right={1, 3, 4, 5, 6, 7, 8})


def torch_detail_table(entries: list[dict]) -> str:
    rows = []
    impl_order = ("loop", "grouped")
    for e in sorted(entries, key=lambda e: (compare.sort_key(compare.key_of(e)),
                                             impl_order.index(e["impl"]) if e.get("impl") in impl_order else 9)):
        tf = compare.tflops_of(e)
        rows.append([str(e["preset"]), str(e["tokens"]), str(e.get("impl", "–")), str(e["precision"]),
                     benchlib.fmt_ms(e["median_ms"]), benchlib.fmt_ms(e.get("min_ms")),
                     f"{tf:.1f}" if tf is not None else "–", benchlib.fmt_ms(e.get("floor_ms")),
                     ratio(e["median_ms"], e.get("floor_ms"))])
    headers = ["preset", "tokens", "impl", "precision", "median ms", "min ms", "TFLOP/s", "floor ms", "× floor"]
    return benchlib.markdown_table(headers, rows, align_right={1, 4, 5, 6, 7, 8})


def ceilings(entries: list[dict]) -> str | None:
    """The rates torch measured at startup (every entry of one run carries the same)."""
    rates = next((e["rates"] for e in entries if isinstance(e.get("rates"), dict)), None)
    if not rates:
        return None
    parts = [f"{label} {rates[key]:.0f} {unit}" for key, label, unit in (
        ("bf16_tflops", "bf16 matmul", "TFLOP/s"), ("tf32_tflops", "TF32 matmul", "TFLOP/s"),
        ("fp32_tflops", "fp32 matmul", "TFLOP/s"), ("copy_gbps", "copy", "GB/s (read + write)")) if key in rates]
    return ", ".join(parts)


def side_by_side(flashmoe: list[dict], torch: list[dict]) -> str:
    """compare.py's --torch table for these entries."""
    with tempfile.TemporaryDirectory() as d:
        paths = []
        for name, entries in (("flashmoe.json", flashmoe), ("torch.json", torch)):
            paths.append(os.path.join(d, name))
            with open(paths[-1], "w") as f:
                json.dump(entries, f)
        index = compare.index_flashmoe([paths[0]], lambda msg: print(msg, file=sys.stderr))
        return compare.torch_table(paths[1], index)


def verify_section(log: str | None) -> list[str]:
    if log is None:
        return ["- `flashmoe verify`: no log (the step did not run)."]
    rows = [line.rstrip() for line in log.splitlines() if re.match(r"(PASS|FAIL)  ", line)]
    passed = sum(r.startswith("PASS") for r in rows)
    verdict = find(r"cases passed|FAILED$", log) or "no final line (it did not finish)"
    out = [f"- `flashmoe verify`: {verdict}" + (f" ({passed} of {len(rows)} case rows PASS)." if rows else ".")]
    wait = find(r"bounded wait", log)
    if wait:
        out.append(f"- Bounded wait: {wait}")
    device = find(r"^device \d+:", log)
    if device:
        out.append(f"- Verify device: {device}")
    failing = [r for r in rows if r.startswith("FAIL")]
    if failing:
        out += ["", "```", *failing, "```"]
    return out


def transformers_section(log: str | None) -> list[str]:
    if log is None:
        return ["- `check_transformers.py`: no log (the step did not run)."]
    cmd = command_of(log) or ""
    backends = re.search(r"--backends (\S+)", cmd)
    verdict = re.sub(r"; files in .*", "", find(r"passed, \d+ failed", log) or "no final line (it did not finish)")
    fails = [line.rstrip() for line in log.splitlines() if line.rstrip().endswith(" FAIL")]
    out = [f"- `check_transformers.py` (backends {backends.group(1) if backends else 'cpu'}, fp32, against "
           f"transformers' own MoE blocks): {verdict}"]
    if fails:
        out += ["", "```", *fails, "```"]
    return out


def sanitizer_section(folder: RunFolder) -> list[str]:
    rows = []
    status = {s[0]: s for s in folder.steps()}
    for name in SANITIZER_RUNS:
        log = folder.log(name)
        if log is None:
            continue
        cmd = command_of(log) or ""
        tool = re.search(r"--tool (\S+)", cmd)
        verb = next((v for v in (" run ", " bench ") if v in cmd), None)
        layer = verb.strip() + " " + cmd.split(verb, 1)[1] if verb else "?"
        summaries = [re.sub(r"^=+\s*", "", line.strip()) for line in log.splitlines()
                     if re.match(r"^=+ (RACECHECK|ERROR) SUMMARY:", line)]
        step = status.get(name)
        result = f"{step[1]} (exit {step[3]})" if step and step[3] not in ("", "-") else (step[1] if step else "?")
        rows.append([name, tool.group(1) if tool else "?", f"`{cell(layer)}`",
                     cell("; ".join(summaries) or "no summary line"), result])
    if not rows:
        return ["- compute-sanitizer: no logs (the steps did not run)."]
    return [benchlib.markdown_table(["run", "tool", "flashmoe command", "sanitizer summary", "result"], rows)]


def software_line(folder: RunFolder, flashmoe: list[dict], torch: list[dict]) -> list[str]:
    env, smi = folder.log("env") or "", folder.log("nvidia-smi") or ""
    out = []
    driver = re.search(r"Driver Version:\s*(\S+)", smi)
    cuda = re.search(r"CUDA Version:\s*(\S+)", smi)
    if driver:
        out.append(f"driver {driver.group(1)}" + (f" (CUDA {cuda.group(1)})" if cuda else ""))
    for pattern in (r"^torch \S+.*", r"^transformers \S+", r"^compute-sanitizer: .*", r"^binary: .*"):
        line = find(pattern, env)
        if line and not re.search(r"not usable|not found|No such file", line):
            out.append(line)
    nvrtc = find(r"NVRTC \d+\.\d+", folder.log("compile"))
    if nvrtc:
        out.append(nvrtc)
    method = next((e.get("method") for e in flashmoe if e.get("method")), None)
    if method:
        out.append(f"FlashMoE timing: {method}")
    return out


def render(folder: RunFolder, commit: str, date: str, gpu: str, allow_fake: bool) -> str:
    flashmoe = folder.entries("flashmoe.json")
    torch = folder.entries("torch.json")
    if flashmoe is None and torch is None:
        raise RecordError(f"{folder.path} has neither flashmoe.json nor torch.json: is it a gpu-run OUTPUT_DIR?")
    flashmoe, torch = flashmoe or [], torch or []
    if not allow_fake and (is_fake(flashmoe) or is_fake(torch)):
        raise RecordError(f"{folder.path} holds made-up numbers from `gpu-run --dry-run`: they must not go into "
                          f"RESULTS.md (--allow-fake is for tests)")
    steps = folder.steps()
    not_passed = [s for s in steps if s[1] != "PASS"]
    lines = [f"## GPU run of {date}: {gpu}, commit {commit}", ""]
    mode = "quick mode" if any("--quick" in (command_of(folder.log(s[0])) or "") for s in steps) else None
    lines.append(f"Produced by `scripts/gpu-run`{' (' + mode + ')' if mode else ''} and "
                 f"`Benchmarks/record_results.py`; every number below is copied from its JSON files and logs.")
    if steps:
        verdict = (f"{len(steps) - len(not_passed)} of {len(steps)} steps passed"
                   + (": not passed " + ", ".join(f"{s[0]} ({s[1]}{', ' + s[4] if s[4] else ''})"
                                                  for s in not_passed) if not_passed else ""))
        lines.append(f"Steps: {verdict}.")
    sw = software_line(folder, flashmoe, torch)
    if sw:
        lines += ["", "Software: " + "; ".join(sw) + "."]

    lines += ["", "### FlashMoE against PyTorch", "",
              "Speed-up = the faster torch implementation at the same precision / FlashMoE. Floor: FlashMoE's (the "
              "H200 reference rates of docs/performance.md) where it reports one, else torch's (rates measured at startup).",
              ""]
    if flashmoe or torch:
        lines.append(side_by_side(flashmoe, torch))
    if not torch:
        lines += ["", "No torch results (torch.json is missing or empty)."]
    if flashmoe:
        lines += ["", "### FlashMoE in detail", "", flashmoe_table(flashmoe)]
        devices = sorted({str(e.get("device")) for e in flashmoe if e.get("device")})
        if devices:
            lines += ["", "Device: " + ", ".join(devices) + "."]
    else:
        lines += ["", "No FlashMoE benchmark results (flashmoe.json is missing or empty)."]
    if torch:
        lines += ["", "### PyTorch baselines in detail", "", torch_detail_table(torch)]
        c = ceilings(torch)
        if c:
            lines += ["", f"Device ceilings measured by torch_moe_baseline.py: {c}."]

    lines += ["", "### Correctness", ""]
    lines += verify_section(folder.log("verify"))
    lines += transformers_section(folder.log("transformers"))
    lines += ["", *sanitizer_section(folder)]
    if steps:
        rows = [[s[0], s[1], s[2], cell(s[4])] for s in steps]
        lines += ["", "### Steps", "", benchlib.markdown_table(["step", "status", "seconds", "note"], rows,
                                                             align_right={2})]
    return "\n".join(lines) + "\n"


def default_from_run(folder: RunFolder, key: str) -> str | None:
    """The date (YYYY-MM-DD) or GPU the run itself recorded, or None."""
    entries = (folder.entries("flashmoe.json") or []) + (folder.entries("torch.json") or [])
    env = folder.log("env")
    if key == "date":
        stamp = next((str(e["date"]) for e in entries if e.get("date")), None) or find(r"^date: ", env)
        m = re.search(r"\d{4}-\d{2}-\d{2}", stamp or "")
        return m.group(0) if m else None
    device = next((str(e["device"]) for e in entries if e.get("device")), None)
    if device is None and env:
        m = re.search(r"^torch \S+, CUDA \S+, (.+)$", env, re.M)
        device = m.group(1) if m and m.group(1) != "no GPU" else None
    return device


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="A RESULTS.md section from a scripts/gpu-run output folder.")
    p.add_argument("output_dir", help="the OUTPUT_DIR gpu-run wrote (flashmoe.json, torch.json, logs.tgz)")
    p.add_argument("--commit", required=True, help="the commit bin/flashmoe was built from")
    p.add_argument("--date", help="YYYY-MM-DD of the run (default: the date the run recorded)")
    p.add_argument("--gpu", help="the GPU's name (default: the device the run recorded)")
    p.add_argument("--append", metavar="FILE", help="append the section to FILE (e.g. Benchmarks/RESULTS.md)")
    p.add_argument("--allow-fake", action="store_true", help="accept dry-run output (for tests only)")
    args = p.parse_args(argv)
    if not re.fullmatch(r"[0-9a-fA-F]{7,40}", args.commit):
        p.error(f"--commit takes a git commit hash (7 to 40 hex digits), got '{args.commit}'")
    if args.date is not None and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", args.date):
        p.error(f"--date takes YYYY-MM-DD, got '{args.date}'")
    try:
        folder = RunFolder(args.output_dir)
        date = args.date or default_from_run(folder, "date")
        gpu = args.gpu or default_from_run(folder, "gpu")
        if date is None or gpu is None:
            raise RecordError(f"the run recorded no {'date' if date is None else 'GPU'}: give --date and --gpu")
        text = render(folder, args.commit, date, gpu, args.allow_fake)
    except RecordError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + text)
        print(f"appended the {date} run to {args.append}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
