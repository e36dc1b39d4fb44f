#!/usr/bin/env python3
"""The non-finite input rules (docs/nonfinite.md) checked end to end through `flashmoe run` on one backend.

For each layer and precision it runs a clean input and the same input with one token faulted (NaN, +Inf, -Inf in one
element, or the whole row scaled by 1e20 so that the FFN overflows with finite logits), and for the transformers
fixtures (Tests/Fixtures/transformers) a NaN in one expert's gate projection and in one router row. Checks:

  - ids lie in [0, E) or are -1 with weight 0, and a -1 never precedes a routed rank;
  - a NaN token has every rank -1, and y = 0 (no shared expert) or NaN in every element (shared expert);
  - every token the fault does not reach has the same ids, weight bits and y bits as the clean run;
  - the faulted token's ids equal the reference backend's (same rules everywhere), and its y is non-finite exactly
    where the reference's is for NaN faults;
  - a NaN expert makes y NaN for exactly the tokens routed to it; a NaN router row is never chosen.

    python3 scripts/nonfinite_check.py --bin bin/flashmoe --backend cuda --reference cpu --out DIR

Needs numpy. Exit status 0 when every check holds; the failures are printed.
"""

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys

import numpy as np

DTYPES = {"F32": np.float32, "F64": np.float64, "I32": np.int32, "F16": np.float16, "I64": np.int64}


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        if e["dtype"] == "BF16":
            b, end = e["data_offsets"]
            raw = np.frombuffer(data[8 + n + b : 8 + n + end], dtype=np.uint16).astype(np.uint32) << 16
            out[name] = raw.view(np.float32).reshape(e["shape"])
            continue
        b, end = e["data_offsets"]
        out[name] = np.frombuffer(data[8 + n + b : 8 + n + end], dtype=DTYPES[e["dtype"]]).reshape(e["shape"])
    return out, header


def write_safetensors(path, tensors, raw_header=None):
    """Writes float32 tensors; with raw_header, rewrites a file keeping its header and other tensors' bytes."""
    header, blobs, offset = {}, [], 0
    for name, a in tensors.items():
        a = np.ascontiguousarray(a, dtype=np.float32)
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        blobs.append(a.tobytes())
        offset += a.nbytes
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def poke(path, name, index, value):
    """Overwrites element `index` (flat) of tensor `name` in place, in its own dtype (F32, BF16 or F16)."""
    with open(path, "r+b") as f:
        data = f.read()
        (n,) = struct.unpack("<Q", data[:8])
        e = json.loads(data[8 : 8 + n])[name]
        size = {"F32": 4, "BF16": 2, "F16": 2}[e["dtype"]]
        bits = np.array([value], dtype=np.float32)
        raw = {"F32": bits.tobytes(), "BF16": (bits.view(np.uint32) >> 16).astype(np.uint16).tobytes(),
               "F16": bits.astype(np.float16).tobytes()}[e["dtype"]]
        f.seek(8 + n + e["data_offsets"][0] + index * size)
        f.write(raw)


class Checker:
    def __init__(self):
        self.failures, self.checks, self.skipped = [], 0, 0

    def expect(self, ok, what):
        self.checks += 1
        if not ok:
            self.failures.append(what)
            print("  FAIL " + what)


class Unsupported(RuntimeError):
    """The backend refused the layer with a typed error (e.g. a shape the GPU kernel does not take)."""


def run(args, layer_args, x_path, y_path, backend, precision):
    cmd = [args.bin, "run", *layer_args, "--input", x_path, "--backend", backend, "--output", y_path]
    if precision:
        cmd += ["--precision", precision]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if p.returncode != 0:
        kind = Unsupported if "the GPU kernel needs" in p.stderr or "supports up to" in p.stderr else RuntimeError
        raise kind(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.strip()[-800:]}")
    out, _ = read_safetensors(y_path)
    return out["y"], out["topk_ids"], out["topk_weights"], p.stdout


def same_token(a, b, t):
    ya, ia, wa = a
    yb, ib, wb = b
    return (np.array_equal(ia[t], ib[t]) and np.array_equal(wa[t].view(np.uint32), wb[t].view(np.uint32))
            and np.array_equal(ya[t].view(np.uint32), yb[t].view(np.uint32)))


def check_ids(c, label, ids, w, experts):
    routed = ids >= 0
    c.expect(bool(np.all((ids >= -1) & (ids < experts))), f"{label}: ids out of range")
    c.expect(bool(np.all(w[~routed] == 0)), f"{label}: unrouted ranks with a non-zero weight")
    c.expect(bool(np.all(routed[:, 1:] <= routed[:, :-1])), f"{label}: a routed rank after an unrouted one")


def x_faults(args, c):
    """Faults in one token's x, on preset layers at a size with several token tiles."""
    layers = {
        "paper-e32 (softmax, plain relu)": ["--preset", "paper-e32", "--hidden", "512", "--intermediate", "256"],
        "qwen3 (softmax, gated silu, k=8)": ["--preset", "qwen3-30b-a3b", "--hidden", "512", "--intermediate",
                                             "128", "--experts", "64"],
        "deepseek (sigmoid groups, bias, shared)": ["--preset", "deepseek-v3", "--hidden", "512",
                                                    "--intermediate", "128", "--experts", "64",
                                                    "--shared-intermediate", "128"],
        "mixtral (softmax, gated, k=2)": ["--preset", "mixtral-8x7b", "--hidden", "512", "--intermediate", "256"],
    }
    tokens, hidden = args.tokens, 512
    faulty = [17, min(300, tokens - 1)]  # two tokens in different 128-token tiles
    rng = np.random.default_rng(5)
    clean_x = rng.uniform(-1, 1, size=(tokens, hidden)).astype(np.float32)
    faults = {"nan": np.nan, "+inf": np.inf, "-inf": -np.inf, "overflow": None}
    for name, layer in layers.items():
        shared = "deepseek" in name
        for precision in args.precisions:
            label = f"{name}, {precision}"
            print(f"{label}")
            x_path = os.path.join(args.out, "x.safetensors")
            write_safetensors(x_path, {"x": clean_x})
            first = run(args, layer, x_path, os.path.join(args.out, "y.safetensors"), args.backend, precision)
            clean = first[:3]
            experts = int(re.search(r" E=(\d+) ", first[3]).group(1))
            for fault, value in faults.items():
                x = clean_x.copy()
                for t in faulty:
                    if value is None:
                        x[t] *= np.float32(1e20)
                    else:
                        x[t, 5] = value
                write_safetensors(x_path, {"x": x})
                y_path = os.path.join(args.out, "y.safetensors")
                got = run(args, layer, x_path, y_path, args.backend, precision)
                ref = run(args, layer, x_path, y_path, args.reference, precision)
                y, ids, w, text = got
                check_ids(c, f"{label}, {fault}", ids, w, experts)
                others = [t for t in range(tokens) if t not in faulty]
                changed = [t for t in others if not same_token(got[:3], clean, t)]
                c.expect(not changed, f"{label}, {fault}: tokens {changed[:8]} differ from the clean run")
                for t in faulty:
                    c.expect(np.array_equal(ids[t], ref[1][t]),
                             f"{label}, {fault}: token {t} ids {ids[t]} but {args.reference} has {ref[1][t]}")
                if fault == "nan":
                    for t in faulty:
                        c.expect(bool(np.all(ids[t] == -1)), f"{label}: NaN token {t} was routed: {ids[t]}")
                        want = np.all(np.isnan(y[t])) if shared else np.all(y[t] == 0)
                        c.expect(bool(want), f"{label}: NaN token {t} has y {y[t][:4]}…")
                        c.expect(np.array_equal(np.isnan(y[t]), np.isnan(ref[0][t])),
                                 f"{label}: NaN token {t}: NaN pattern differs from {args.reference}")
                    c.expect("2 tokens with no expert" in text, f"{label}: the summary misses the unrouted tokens")
                if fault == "overflow" and "relu" not in name:
                    for t in faulty:
                        c.expect(bool(np.all(ids[t] >= 0)), f"{label}: overflow token {t} lost a rank: {ids[t]}")
                        c.expect(not np.all(np.isfinite(y[t])), f"{label}: overflow token {t} has a finite y")


def weight_faults(args, c):
    """NaN in one expert's gate projection and in one router row, on the transformers fixtures (layer 1)."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "Tests", "Fixtures", "transformers")
    tokens = 300
    rng = np.random.default_rng(9)
    for family in ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"]:
        src = os.path.join(root, family, "save_pretrained")
        dst = os.path.join(args.out, family)
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
        model = os.path.join(dst, "model.safetensors")
        original = open(model, "rb").read()
        _, header = read_safetensors(model)
        block = "block_sparse_moe" if family == "mixtral" else "mlp"
        gate = "w1" if family == "mixtral" else "gate_proj"
        router = f"model.layers.1.{block}.gate.weight"
        hidden = header[router]["shape"][1]
        x_path = os.path.join(args.out, "x.safetensors")
        write_safetensors(x_path, {"x": rng.uniform(-1, 1, size=(tokens, hidden)).astype(np.float32)})
        layer = ["--checkpoint", dst, "--layer", "1"]
        y_path = os.path.join(args.out, "y.safetensors")
        for precision in args.precisions:
            label = f"{family}, {precision}"
            print(label)
            with open(model, "wb") as f:
                f.write(original)
            try:
                clean = run(args, layer, x_path, y_path, args.backend, precision)[:3]
            except Unsupported as e:  # a fixture shape the backend refuses, with its typed error: nothing to check
                print(f"  skipped: {str(e).split(': ')[-1]}")
                c.skipped += 1
                continue
            bad = int(clean[1][0, 0])
            poke(model, f"model.layers.1.{block}.experts.{bad}.{gate}.weight", 3, np.nan)
            y, ids, w, _ = run(args, layer, x_path, y_path, args.backend, precision)
            c.expect(np.array_equal(ids, clean[1]), f"{label}: NaN expert weights changed the routing")
            uses = np.any(ids == bad, axis=1)
            c.expect(bool(np.all(np.isnan(y[uses]))), f"{label}: a token of expert {bad} has a non-NaN y")
            changed = [t for t in range(tokens) if not uses[t] and not same_token((y, ids, w), clean, t)]
            c.expect(not changed, f"{label}: tokens {changed[:8]} not on expert {bad} changed")
            with open(model, "wb") as f:
                f.write(original)
            poke(model, router, bad * hidden + 1, np.nan)
            y, ids, w, _ = run(args, layer, x_path, y_path, args.backend, precision)
            check_ids(c, f"{label}, NaN router row", ids, w, header[router]["shape"][0])
            c.expect(not np.any(ids == bad), f"{label}: expert {bad} with a NaN router row was chosen")
            c.expect(bool(np.all(np.isfinite(y))), f"{label}: a NaN router row made y non-finite")
        with open(model, "wb") as f:
            f.write(original)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", default=os.environ.get("FLASHMOE_BIN", "bin/flashmoe"))
    p.add_argument("--backend", default="cuda", help="the backend under test (cuda, cpu or oracle)")
    p.add_argument("--reference", default="cpu", help="the backend the faulted token's ids are compared with")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--tokens", type=int, default=700)
    p.add_argument("--timeout", type=int, default=120)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    args.precisions = args.precisions.split(",")
    os.makedirs(args.out, exist_ok=True)
    c = Checker()
    x_faults(args, c)
    weight_faults(args, c)
    print(f"nonfinite_check: {args.backend} against {args.reference}: {c.checks} checks, {len(c.failures)} failed"
          + (f" ({c.skipped} layers refused by the backend, skipped)" if c.skipped else ""))
    return 1 if c.failures else 0


if __name__ == "__main__":
    sys.exit(main())
