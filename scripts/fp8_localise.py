#!/usr/bin/env python3
"""Localises the fp8 kernel's error against the fp8 oracle (docs/fp8.md, issue 14) on two tiny FP8 checkpoints.

`flashmoe verify --filter fp8` measured 2.5e-3 to 8e-3 between the kernel and the fp8 oracle, where the CPU fast path
lands within 6e-5. Two explanations predict that size: a scale read from the wrong block, granule or row (a layout
bug), or the FP8 tensor cores' own accumulation, which keeps about 13 bits and truncates (Hopper's FP8 MMA; DeepSeek-V3
promotes every 128 K for this reason), an error of ~1e-4 in GEMM0 that the re-quantization of h amplifies: a flipped
BF16 rounding of the largest |h| of a 128-channel group changes that group's scale and so all of its 128 codes.

This script tells them apart. It writes two Qwen3-MoE FP8 checkpoints (H = 384: three K blocks; I = 192: a short K
block in GEMM1 and three 64-row granules per gated matrix; E = 8, k = 2) and an input of S = 256 tokens, where every
128x128 weight block and every (token, 128-channel group) of x has its own scale (factors 2^-1 … 2^1), so a scale
taken from the wrong block, granule, matrix (gate/up) or row changes the output by tens of percent:

  narrow   every E4M3 code of x and of the weights lies in [256, 448] (one binade): each product is a multiple of
           2^10 below 2^17.7, and with random signs every partial sum of a 128-wide K block stays far below 2^24
           (14 significant bits), so the tensor cores sum GEMM0 exactly even with a 13-bit accumulator. h, and so
           GEMM1's codes, are generic: GEMM1's own truncation (~1e-4) remains.
  generic  the values spread over the whole E4M3 range as in `verify` (uniform within each block).

For each it runs `flashmoe run --precision fp8` on --backend cuda (and oracle, cpu), compares y over the tokens whose
routing agrees, and prints next to the measurements what a NumPy model of the same arithmetic predicts with FP32
accumulation (the CPU fast path) and with the FP8 MMA's published behaviour (13-bit alignment and truncation,
e8m13 results; `tensor_core_k32`), promoted per 128 K or per instruction.

With --promote-steps 1 it also runs cuda on a copy of the kernel sources built with FMOE_FP8_PROMOTE_STEPS = 1
(FLASHMOE_KERNEL_DIR): a promotion after every k32 instruction, which changes the accumulation but no layout.

Reading the result: narrow at the 1e-4 level, generic near its prediction and smaller with --promote-steps 1 → the
kernel computes the oracle's arithmetic and the gap is the tensor cores' accumulation; narrow at 1e-2 or above →
a scale or code is misplaced (a misplaced scale gives 0.4 to 0.9 on these checkpoints).

    python3 scripts/fp8_localise.py --bin bin/flashmoe --out DIR [--backends cuda,cpu] [--promote-steps 1]

Needs numpy. FLASHMOE_EXPERIMENTAL_FP8=1 must be set for --backend cuda (scripts/gpu-fp8-localise sets it).
Exit status: 0 when every run completed (the numbers are for a person to read), 1 otherwise.
"""

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np

H, I, E, K, S = 384, 192, 8, 2, 256
BLOCK = 128


# ---- E4M3 and BF16 (docs/fp8.md) --------------------------------------------------------------------------------

def bf16(a):
    """Rounds FP32 values to BF16 (nearest, ties to even), as FP32."""
    b = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.astype(np.uint32).view(np.float32)


def e4m3_codes(v):
    """FP32 values → E4M3 codes (uint8): nearest, ties to even, saturating at ±448 (finite inputs only)."""
    v = np.asarray(v, dtype=np.float32).astype(np.float64)
    a, sign = np.abs(v), (np.signbit(v).astype(np.uint8) << 7)
    code = np.zeros(a.shape, dtype=np.int64)
    sub = a < 2.0**-6
    code[sub] = np.round(a[sub] * 512).astype(np.int64)  # m·2^-9; 8 is the first normal's code
    _, e = np.frexp(np.where(sub, 1.0, a))
    e = e - 1  # a = f·2^e, f in [1, 2)
    r = np.round(a * 2.0 ** (3 - e)).astype(np.int64)  # 8…16
    carry = r == 16
    r[carry], e[carry] = 8, e[carry] + 1
    normal = ((e + 7) << 3) | (r - 8)
    code[~sub] = normal[~sub]
    code = np.minimum(code, 0x7E)  # 448
    return (code.astype(np.uint8) | sign).astype(np.uint8)


def e4m3_values(codes):
    """E4M3 codes → exact values (float64)."""
    c = codes.astype(np.int64)
    e, m = (c >> 3) & 15, c & 7
    v = np.where(e == 0, m * 2.0**-9, (8 + m) * 2.0 ** (e - 10))
    return np.where(c & 0x80, -v, v)


def scale_of(amax):
    s = np.float32(np.float32(amax) / np.float32(448))
    return s if s > 0 else np.float32(1)


def quantize_matrix(w):
    """[rows, cols] FP32 → (codes, block scales [⌈rows/128⌉, ⌈cols/128⌉]) by FP8Blocks' rule."""
    r, c = w.shape
    codes = np.zeros((r, c), dtype=np.uint8)
    scales = np.ones(((r + BLOCK - 1) // BLOCK, (c + BLOCK - 1) // BLOCK), dtype=np.float32)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            blk = w[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK]
            s = scale_of(np.abs(blk).max())
            scales[i, j] = s
            codes[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK] = e4m3_codes(blk / s)
    return codes, scales


def quantize_rows(x):
    """[n, width] FP32 → (E4M3 values float64, group scales float32 [n, ⌈width/128⌉]) by FP8Scaling.quantizeRow."""
    n, width = x.shape
    groups = (width + BLOCK - 1) // BLOCK
    values, scales = np.zeros((n, width)), np.ones((n, groups), dtype=np.float32)
    for g in range(groups):
        blk = x[:, g * BLOCK:(g + 1) * BLOCK].astype(np.float32)
        s = (np.abs(blk).max(axis=1) / np.float32(448)).astype(np.float32)
        s[s == 0] = 1
        scales[:, g] = s
        values[:, g * BLOCK:(g + 1) * BLOCK] = e4m3_values(e4m3_codes(blk / s[:, None]))
    return values, scales


# ---- The arithmetic, three ways -----------------------------------------------------------------------------------

def exponent(v, lowest):
    """floor(log2 |v|), `lowest` for subnormals (the format's smallest normal exponent), -999 for zero."""
    _, e = np.frexp(np.where(v == 0, 1.0, np.abs(v)))
    return np.where(v == 0, -999, np.maximum(e - 1, lowest))


def tensor_core_k32(a, w, c):
    """One FP8 MMA instruction d = Σ_k a·w + c per output, as published bit-level measurements of Hopper's FP8
    wgmma describe it: every product (exact, exponent ea + eb) and the addend c are aligned to the largest of their
    exponents and truncated toward zero 13 bits below it, summed exactly, and the sum is truncated toward zero to 13
    fraction bits (e8m13). a [R, 1, 32] and w [1, N, 32] hold E4M3 values, c [R, N] FP32 values or None."""
    pe = exponent(a, -6) + exponent(w, -6)
    p = a * w
    pe = np.where(p == 0, -999, pe)
    top = pe.max(axis=-1)
    if c is not None:
        top = np.maximum(top, exponent(c, -126))
    ulp = 2.0 ** (top - 13)
    s = (np.trunc(p / ulp[..., None]) * ulp[..., None]).sum(axis=-1)
    if c is not None:
        s += np.trunc(c / ulp) * ulp
    out_ulp = 2.0 ** (exponent(s, -126) - 13)
    return np.trunc(s / out_ulp) * out_ulp


def gemm(a, sa, w_codes, w_scales, mode):
    """out[r, n] = Σ_j (Σ_{k in block j} a·w) · sa[r, j] · sw[n/128, j]; mode exact (Float64), fp32 (FP32 block
    sums and FP32 promotion), tc13 (`tensor_core_k32` per instruction, the block's running sum as its addend, FP32
    promotion per K block) or tc13k32 (each instruction promoted on its own)."""
    w = e4m3_values(w_codes)
    rows, kdim = a.shape
    n = w.shape[0]
    acc = np.zeros((rows, n))
    for j in range((kdim + BLOCK - 1) // BLOCK):
        A, W = a[:, j * BLOCK:(j + 1) * BLOCK], w[:, j * BLOCK:(j + 1) * BLOCK]
        sw = np.repeat(w_scales[:, j], BLOCK)[:n].astype(np.float32)
        if mode == "exact":
            acc += (A @ W.T) * (sa[:, j:j + 1].astype(np.float64) * sw[None, :].astype(np.float64))
            continue
        if mode == "fp32":
            tmp = (A @ W.T).astype(np.float32)
        elif mode == "tc13k32":  # promoted after every k32 instruction (FMOE_FP8_PROMOTE_STEPS = 1)
            f = (sa[:, j:j + 1] * sw[None, :]).astype(np.float64)
            for ks in range(0, A.shape[1], 32):
                t = tensor_core_k32(A[:, None, ks:ks + 32], W[None, :, ks:ks + 32], None).astype(np.float32)
                acc = (acc + t.astype(np.float64) * f.astype(np.float32)).astype(np.float32).astype(np.float64)
            continue
        else:
            tmp = None
            for ks in range(0, A.shape[1], 32):
                tmp = tensor_core_k32(A[:, None, ks:ks + 32], W[None, :, ks:ks + 32], tmp)
            tmp = tmp.astype(np.float32)
        f = (sa[:, j:j + 1] * sw[None, :]).astype(np.float32)
        acc = (acc + tmp.astype(np.float64) * f.astype(np.float64)).astype(np.float32).astype(np.float64)
    return acc


def expert_ffn(x_rows, ex, mode):
    qa, sa = quantize_rows(x_rows)
    g = gemm(qa, sa, *ex["gate"], mode)
    u = gemm(qa, sa, *ex["up"], mode)
    if mode == "exact":
        h = g / (1 + np.exp(-g)) * u
    else:
        g32, u32 = g.astype(np.float32), u.astype(np.float32)
        h = (g32 / (np.float32(1) + np.exp(-g32)) * u32).astype(np.float32)
    qh, sh = quantize_rows(bf16(h.astype(np.float32)))
    return gemm(qh, sh, *ex["down"], mode)


def layer(x, experts, ids, weights, mode):
    y = np.zeros((x.shape[0], H))
    for e in range(E):
        tok, rank = np.nonzero(ids == e)
        if tok.size:
            y[tok] += weights[tok, rank][:, None].astype(np.float64) * expert_ffn(x[tok], experts[e], mode)
    return y


# ---- The checkpoints -----------------------------------------------------------------------------------------------

def make_problem(variant, rng):
    """(x [S, H] BF16 values as FP32, router [E, H] BF16 values, experts: name → (codes, scales))."""
    def weights(rows, cols):
        factors = 2.0 ** rng.uniform(-1, 1, ((rows + BLOCK - 1) // BLOCK, (cols + BLOCK - 1) // BLOCK))
        f = np.kron(factors, np.ones((BLOCK, BLOCK)))[:rows, :cols] / np.sqrt(cols)
        if variant == "narrow":
            # Codes 256…448 (E4M3 exponent 8), random sign; the block scale carries the size.
            codes = (0x78 + rng.integers(0, 7, (rows, cols))).astype(np.uint8)
            codes |= (rng.integers(0, 2, (rows, cols)) << 7).astype(np.uint8)
            scales = (factors / np.sqrt(cols) / 400).astype(np.float32)
            return codes, scales
        return quantize_matrix(bf16((rng.uniform(-1, 1, (rows, cols)) * f).astype(np.float32)))

    group = np.kron(2.0 ** rng.uniform(-1, 1, (S, H // BLOCK)), np.ones((1, BLOCK)))
    if variant == "narrow":
        # |x| in [0.62, 1]·(group factor): x / (amax / 448) ≥ 0.62 · 448 > 256 after BF16 rounding.
        mag = rng.uniform(0.62, 1.0, (S, H))
    else:
        mag = rng.uniform(0, 1.7, (S, H))
    x = bf16((np.where(rng.integers(0, 2, (S, H)) == 1, -1, 1) * mag * group).astype(np.float32))
    router = bf16(rng.uniform(-1, 1, (E, H)).astype(np.float32) / np.float32(np.sqrt(H)))
    experts = [{"gate": weights(I, H), "up": weights(I, H), "down": weights(H, I)} for _ in range(E)]
    return x, router, experts


def write_safetensors(path, tensors):
    """tensors: name → (dtype string, shape, raw bytes)."""
    header, blobs, offset = {}, [], 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    types = {"F32": np.float32, "I32": np.int32}
    out = {}
    for name, e in header.items():
        if name != "__metadata__":
            b, end = e["data_offsets"]
            out[name] = np.frombuffer(data[8 + n + b:8 + n + end], dtype=types[e["dtype"]]).reshape(e["shape"])
    return out


def bf16_bytes(a):
    return (bf16(a).view(np.uint32) >> 16).astype(np.uint16).tobytes()


def write_checkpoint(directory, x, router, experts):
    os.makedirs(directory, exist_ok=True)
    config = {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": H,
        "num_hidden_layers": 1, "hidden_act": "silu", "num_experts_per_tok": K, "moe_intermediate_size": I,
        "num_experts": E, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [BLOCK, BLOCK]},
    }
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    prefix = "model.layers.0.mlp"
    tensors = {f"{prefix}.gate.weight": ("BF16", router.shape, bf16_bytes(router))}
    for e, ex in enumerate(experts):
        for proj, key in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
            codes, scales = ex[key]
            name = f"{prefix}.experts.{e}.{proj}.weight"
            tensors[name] = ("F8_E4M3", codes.shape, codes.tobytes())
            tensors[name + "_scale_inv"] = ("F32", scales.shape, scales.astype(np.float32).tobytes())
    write_safetensors(os.path.join(directory, "model.safetensors"), tensors)
    write_safetensors(os.path.join(directory, "x.safetensors"), {"x": ("F32", x.shape, x.astype(np.float32).tobytes())})


def kernel_copy(args, steps):
    """A copy of the kernel sources built with FMOE_FP8_PROMOTE_STEPS = steps (for FLASHMOE_KERNEL_DIR)."""
    target = os.path.join(args.out, f"kernels-promote{steps}")
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(args.kernels, target)
    path = os.path.join(target, "wgmma_fp8.cuh")
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace("#pragma once\n", f"#pragma once\n#define FMOE_FP8_PROMOTE_STEPS {steps}\n", 1))
    return target


def run(args, directory, backend, kernels=None):
    out = os.path.join(directory, f"y-{backend}{'-' + os.path.basename(kernels) if kernels else ''}.safetensors")
    cmd = [args.bin, "run", "--checkpoint", directory, "--layer", "0", "--input",
           os.path.join(directory, "x.safetensors"), "--precision", "fp8", "--backend", backend, "--output", out]
    env = dict(os.environ, **({"FLASHMOE_KERNEL_DIR": kernels} if kernels else {}))
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.strip()[-600:]}")
    return read_safetensors(out)


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="bin/flashmoe")
    ap.add_argument("--out", required=True, help="directory for the checkpoints and outputs")
    ap.add_argument("--backends", default="cuda,cpu", help="compared with the oracle (comma-separated)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--timeout", type=int, default=120)
    ap.add_argument("--promote-steps", type=int, default=0, choices=[0, 1, 2],
                    help="also run cuda with the kernel promoting every N k32 steps (0: skip)")
    ap.add_argument("--kernels", default="Sources/CKernels/kernels", help="kernel sources to copy for --promote-steps")
    args = ap.parse_args()
    ok = True
    for variant in ("narrow", "generic"):
        rng = np.random.default_rng(args.seed)
        x, router, experts = make_problem(variant, rng)
        directory = os.path.join(args.out, variant)
        write_checkpoint(directory, x, router, experts)
        try:
            oracle = run(args, directory, "oracle")
        except RuntimeError as e:
            print(f"{variant}: oracle failed: {e}")
            ok = False
            continue
        ids, w = oracle["topk_ids"], oracle["topk_weights"]
        exact = layer(x, experts, ids, w, "exact")
        print(f"{variant}: this script's Float64 emulation vs the oracle: {rel(exact, oracle['y']):.2e} "
              "(should be ~1e-7: the script reproduces the oracle)")
        print(f"{variant}: model, FP32 accumulation vs exact:           {rel(layer(x, experts, ids, w, 'fp32'), exact):.2e}")
        print(f"{variant}: model, 13-bit tensor-core accumulation:      {rel(layer(x, experts, ids, w, 'tc13'), exact):.2e}")
        print(f"{variant}: model, the same promoted after every k32:    {rel(layer(x, experts, ids, w, 'tc13k32'), exact):.2e}")
        runs = [(b, None) for b in args.backends.split(",")]
        if args.promote_steps and "cuda" in args.backends.split(","):
            runs.append(("cuda", kernel_copy(args, args.promote_steps)))
        for backend, kernels in runs:
            label = backend + (f" (FMOE_FP8_PROMOTE_STEPS={args.promote_steps})" if kernels else "")
            try:
                y = run(args, directory, backend, kernels)
            except RuntimeError as e:
                print(f"{variant}: {label} failed: {e}")
                ok = False
                continue
            same = np.all(y["topk_ids"] == ids, axis=1)
            err = rel(y["y"][same].astype(np.float64), oracle["y"][same].astype(np.float64))
            print(f"{variant}: measured {label} vs oracle:  {err:.2e}  ({int(same.sum())} of {S} tokens routed alike)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
