#!/usr/bin/env python3
"""Stand-ins for the GPU host's tools, for `scripts/gpu-run --dry-run` on a machine without a GPU.

    python3 scripts/gpu_run_fake.py TOOL ARGS...

TOOL is flashmoe, nvidia-smi, compute-sanitizer, torch (Benchmarks/torch_moe_baseline.py) or transformers
(scripts/check_transformers.py). Each checks its arguments the way the real tool would (the torch and transformers
stand-ins use those scripts' own parsers; flashmoe checks each subcommand's options against the CLI's), prints
lines shaped like the real output and writes the files the real tool writes. Every number is made up, and every
JSON entry carries "fake": true so that Benchmarks/record_results.py refuses it.

Environment, to test gpu-run's handling of failures (each a ';'-separated list of substrings of the command line
`TOOL ARGS...`):
  FAKE_GPU_FAIL      matching commands print an error and exit 1
  FAKE_GPU_HANG      matching commands sleep for an hour (gpu-run's timeout must end them)
  FAKE_GPU_SANITIZER_ERRORS  matching compute-sanitizer commands report 2 errors
  FAKE_GPU_NO_SUMMARY        matching compute-sanitizer commands print no summary line (and exit 0)
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "Benchmarks"))
sys.path.insert(0, HERE)
import benchlib  # noqa: E402

DEVICE = "FAKE GPU (gpu-run dry run)"

#: The options each flashmoe subcommand takes (value-taking options; flags are listed in FLAGS).
OPTIONS = {
    "info": set(),
    "selftest": set(),
    "compile": {"--arch", "--preset", "--precision"},
    "verify": {"--device", "--seed", "--filter"},
    "run": {"--preset", "--checkpoint", "--layer", "--input", "--tokens", "--backend", "--device", "--precision",
            "--capacity-factor", "--seed", "--output", "--hidden", "--intermediate", "--experts", "--top-k",
            "--ffn", "--activation", "--router", "--groups", "--groups-kept", "--scaling",
            "--shared-intermediate"},
    "bench": {"--preset", "--tokens", "--warmup", "--iterations", "--backend", "--device", "--precision",
              "--capacity-factor", "--seed", "--json", "--hidden", "--intermediate", "--experts", "--top-k",
              "--ffn", "--activation", "--router", "--groups", "--groups-kept", "--scaling",
              "--shared-intermediate", "--ranks", "--rank-devices", "--trace", "--trace-events"},
}
FLAGS = {"compile": {"--lineinfo", "--no-cache"}, "selftest": {"--compiler-only"},
         "verify": {"--skip-fault-check"}, "run": {"--verbose", "--bias", "--no-bias"},
         "bench": {"--verbose", "--bias", "--no-bias", "--phase-times"}}
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
BACKENDS = ("auto", "cpu", "oracle", "cuda")


class Usage(Exception):
    """Arguments the real tool would refuse."""


def matches(variable: str, command: list[str]) -> bool:
    line = " ".join(command)
    return any(s and s in line for s in os.environ.get(variable, "").split(";"))


def parse_options(sub: str, args: list[str]) -> dict[str, str]:
    """`--name value` pairs and flags of a flashmoe subcommand, refusing what the CLI does not know."""
    if sub not in OPTIONS:
        raise Usage(f"unknown subcommand '{sub}'")
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if a in FLAGS.get(sub, set()):
            out[a] = ""
            i += 1
        elif a in OPTIONS[sub]:
            if i + 1 >= len(args):
                raise Usage(f"missing value for '{a}'")
            out[a] = args[i + 1]
            i += 2
        else:
            raise Usage(f"unknown option '{a}' for '{sub}'")
    if out.get("--precision", "bf16") not in PRECISIONS and sub != "compile":
        raise Usage(f"bad --precision {out['--precision']}")
    if out.get("--backend", "auto") not in BACKENDS:
        raise Usage(f"bad --backend {out['--backend']}")
    if "--preset" in out and sub != "compile" and out["--preset"] not in benchlib.PRESETS:
        raise Usage(f"unknown preset {out['--preset']}")
    return out


def made_up_ms(*key) -> float:
    """A stable made-up time for a case, so reruns give the same fake table."""
    h = int(hashlib.sha256(repr(key).encode()).hexdigest()[:8], 16)
    return 0.2 + (h % 10_000) / 1000.0


def fake_flashmoe(args: list[str]) -> int:
    if not args:
        raise Usage("no subcommand")
    sub, opts = args[0], parse_options(args[0], args[1:])
    if sub == "info":
        print(f"cuda: usable: 1 GPU: 0: {DEVICE}\ncubin cache: /tmp/fake (0 entries)")
    elif sub == "selftest":
        print("selftest: NVRTC ok, cubin cache ok, copies ok, launch ok, cooperative launch ok")
    elif sub == "compile":
        for p in opts.get("--preset", "paper-e32").split(","):
            print(f"fake kernel {p} {opts.get('--arch', 'sm_90a')}: 100 KB cubin, 1.0 ms, cache miss")
    elif sub == "verify":
        print(f"device 0: {DEVICE}, 132 SMs, sm_90a")
        print("result case                              prec  E    k  H     I      S     rel.err   tol")
        print("PASS  paper-e64                         bf16  64   2  2048  2048   200   3.1e-3    1.0e-2")
        print("PASS  S=0                               bf16  8    2  64    96     0     0         1.0e-2")
        print("PASS bounded wait: typed error after 201 ms: fake; a normal launch afterwards ran")
        print("all 2 cases passed")
    elif sub == "run":
        print(f"backend: cuda (--backend cuda)\ndevice: {DEVICE}\ntime: 1.00 ms for the forward pass")
    elif sub == "bench":
        preset = opts.get("--preset", "paper-e32")
        spec = benchlib.PRESETS[preset]
        tokens = int(opts.get("--tokens", spec.tokens[0]))
        precision = opts.get("--precision", "fp32")
        ms = made_up_ms("flashmoe", preset, tokens, precision)
        flops = benchlib.layer_flops(spec, tokens)
        entry = {"backend": "cuda", "preset": preset, "tokens": tokens, "precision": precision, "median_ms": ms,
                 "min_ms": ms * 0.98, "tflops": flops / (ms * 1e-3) / 1e12, "gflops": flops / (ms * 1e-3) / 1e9,
                 "floor_ms": ms / 2, "workspace_bytes": 1 << 20, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ"),
                 "device": DEVICE, "method": "fake", "config": preset, "fake": True}
        print(f"median {ms:.3f} ms, min {ms * 0.98:.3f} ms")
        if "--json" in opts:
            with open(opts["--json"], "w") as f:
                json.dump([entry], f)
            print(f"wrote {opts['--json']}")
        if "--trace" in opts:
            # The shape of KernelTrace.chromeJSON: one process per block, complete ("X") events in microseconds.
            events = [{"name": "GEMM0 e0 rb0 n0", "cat": "GEMM0", "ph": "X", "ts": 1.0, "dur": 2.5, "pid": 0,
                       "tid": 0, "args": {"expert": 0, "row_block": 0, "column_tile": 0}}]
            with open(opts["--trace"], "w") as f:
                json.dump({"traceEvents": events, "displayTimeUnit": "ns", "otherData": {"fake": True}}, f)
            print("timeline: 1 events over 1 blocks, 2.5 µs from the first begin to the last end")
            print("  GEMM0: 1 × mean 2.5 µs = 2.5 µs of block time, from 0.0 to 2.5 µs")
            print(f"wrote {opts['--trace']} (open it in ui.perfetto.dev)")
        if "--ranks" in opts:
            print(f"ranks: {opts['--ranks']} on one GPU: median {ms * 1.05:.3f} ms vs one rank {ms:.3f} ms "
                  "(5.0 % protocol overhead)")
    return 0


def fake_sanitizer(args: list[str]) -> int:
    tool, error_exit, i = "memcheck", None, 0
    while i < len(args) and args[i].startswith("--"):
        if args[i] == "--tool":
            tool = args[i + 1]
        elif args[i] == "--error-exitcode":
            error_exit = int(args[i + 1])
        i += 2
    if tool not in ("memcheck", "racecheck", "initcheck", "synccheck"):
        raise Usage(f"unknown --tool {tool}")
    print("========= COMPUTE-SANITIZER")
    sys.stdout.flush()
    rc = subprocess.call(args[i:])
    errors = 2 if matches("FAKE_GPU_SANITIZER_ERRORS", ["compute-sanitizer"] + args) else 0
    if matches("FAKE_GPU_NO_SUMMARY", ["compute-sanitizer"] + args):
        return rc
    if tool == "racecheck":
        print(f"========= RACECHECK SUMMARY: {errors} hazards displayed ({errors} errors, 0 warnings)")
    print(f"========= ERROR SUMMARY: {errors} error{'s' if errors != 1 else ''}")
    if errors and error_exit is not None:
        return error_exit
    return rc


def fake_torch(args: list[str]) -> int:
    import torch_moe_baseline as tmb  # its parser needs no torch

    a = tmb.parse_args(args)
    print(f"torch fake, CUDA fake, {DEVICE}")
    rates = {"bf16_tflops": 700.0, "tf32_tflops": 380.0, "fp32_tflops": 50.0, "copy_gbps": 4000.0}
    results = []
    for name in a.presets:
        spec = benchlib.PRESETS[name]
        for prec in a.precisions:
            impls, checking, _ = tmb.plan_case(a, name, prec)
            for s in a.tokens or spec.tokens:
                for impl in impls:
                    ms = made_up_ms("torch", name, s, impl, prec)
                    results.append({"preset": name, "tokens": s, "impl": impl, "precision": prec, "median_ms": ms,
                                    "min_ms": ms * 0.97, "tflops": 1.0, "floor_ms": ms / 3, "backend": "torch",
                                    "device": DEVICE, "torch": "fake", "rates": rates, "fake": True})
                    print(f"  {name} S={s} {impl} {prec}: median {ms:.3f} ms")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f)
        print(f"wrote {len(results)} results to {a.json}")
    return 0


def fake_transformers(args: list[str]) -> int:
    import check_transformers as ct  # its parser needs no torch

    a = ct.parse_args(args)
    rows = len(a.families) * 2 * len(a.backends) + sum(ct.dense_layer_zero(f) for f in a.families)
    print(f"torch fake, transformers fake, flashmoe {a.flashmoe}")
    print(f"\n{rows} passed, 0 failed (tolerance {a.tolerance:g}); files in /tmp/fake")
    return 0


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    tool, args = argv[0], argv[1:]
    if matches("FAKE_GPU_HANG", argv):
        print(f"fake {tool}: hanging as FAKE_GPU_HANG asks", flush=True)
        time.sleep(3600)
    if matches("FAKE_GPU_FAIL", argv):
        print(f"Error: fake {tool} failing as FAKE_GPU_FAIL asks", file=sys.stderr)
        return 1
    tools = {"flashmoe": fake_flashmoe, "compute-sanitizer": fake_sanitizer, "torch": fake_torch,
             "transformers": fake_transformers,
             "nvidia-smi": lambda _: print(f"| NVIDIA-SMI fake  Driver Version: 0.0  CUDA Version: 13.0 |\n"
                                           f"| 0  {DEVICE} |") or 0}
    if tool not in tools:
        print(f"error: unknown tool {tool}; choose from {', '.join(tools)}", file=sys.stderr)
        return 2
    try:
        return tools[tool](args)
    except Usage as e:
        print(f"Error: {e} (fake {tool} refuses what the real one would)", file=sys.stderr)
        return 64


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
