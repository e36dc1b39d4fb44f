#!/usr/bin/env python3
"""The distribution of the GPU fp8 path's error against the fp8 oracle, by the bit-level model of the FP8 tensor
cores (`tensor_core_k32` in scripts/fp8_localise.py), on random layers drawn like `flashmoe verify`'s fp8 cases:
weights uniform in ±1/√fan_in rounded to BF16 and quantized in 128×128 blocks, x uniform in ±1.7 rounded to BF16,
gated SiLU experts, each token's k experts and weights random (the error does not depend on the router).

With --narrow the layers are drawn like the one-binade case instead (`Verifier.oneBinadeFP8`: every E4M3 code of
the weights and x in 256…448, a scale of its own per block and group): the numbers behind its tolerance.

It prints, per token count, the median, the 99th percentile and the largest of ‖y_model − y_exact‖ / ‖y_exact‖ over
the draws: the numbers behind `Precision.tolerance(for: .cuda)` (docs/fp8.md, "Tolerances").

    python3 scripts/fp8_tolerance.py [--draws 400] [--tokens 1,16,129] [--hidden 256] [--inner 256] [--narrow]
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fp8_localise import BLOCK, bf16, expert_ffn, quantize_matrix  # noqa: E402


def draw(rng, s, h, i, e, k, narrow):
    def weights(rows, cols):
        if narrow:  # Verifier.oneBinadeFP8: codes 0x78…0x7E, random signs, a scale per block
            codes = (0x78 + rng.integers(0, 7, (rows, cols))).astype(np.uint8)
            codes |= (rng.integers(0, 2, (rows, cols)) << 7).astype(np.uint8)
            shape = (-(-rows // BLOCK), -(-cols // BLOCK))
            return codes, (2.0 ** rng.uniform(-1, 1, shape) / (400 * np.sqrt(cols))).astype(np.float32)
        return quantize_matrix(bf16(rng.uniform(-1, 1, (rows, cols)).astype(np.float32) / np.float32(np.sqrt(cols))))
    if narrow:
        group = np.kron(2.0 ** rng.uniform(-1, 1, (s, -(-h // BLOCK))), np.ones((1, BLOCK)))[:, :h]
        sign = np.where(rng.integers(0, 2, (s, h)) == 1, -1, 1)
        x = bf16((sign * rng.uniform(0.62, 1.0, (s, h)) * group).astype(np.float32))
    else:
        x = bf16(rng.uniform(-1.7, 1.7, (s, h)).astype(np.float32))
    experts = [{"gate": weights(i, h), "up": weights(i, h), "down": weights(h, i)} for _ in range(e)]
    ids = np.stack([rng.choice(e, k, replace=False) for _ in range(s)])
    w = rng.dirichlet(np.ones(k), s).astype(np.float32)
    return x, experts, ids, w


def layer(x, experts, ids, w, mode):
    y = np.zeros(x.shape)
    for e in range(len(experts)):
        tok, rank = np.nonzero(ids == e)
        if tok.size:
            y[tok] += w[tok, rank][:, None].astype(np.float64) * expert_ffn(x[tok], experts[e], mode)
    return y


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draws", type=int, default=400)
    ap.add_argument("--tokens", default="1,16,129")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--inner", type=int, default=256)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--narrow", action="store_true",
                    help="the one-binade layers of the verify case 'fp8 one binade, own scales' (try --hidden 384 --inner 192)")
    args = ap.parse_args()
    for s in (int(t) for t in args.tokens.split(",")):
        rng = np.random.default_rng(args.seed + s)
        errors = []
        for _ in range(args.draws):
            x, experts, ids, w = draw(rng, s, args.hidden, args.inner, args.experts, args.topk, args.narrow)
            exact = layer(x, experts, ids, w, "exact")
            model = layer(x, experts, ids, w, "tc13")
            errors.append(np.linalg.norm(model - exact) / np.linalg.norm(exact))
        a = np.array(errors)
        print(f"S={s} H={args.hidden} I={args.inner} k={args.topk}, {args.draws} draws: median {np.median(a):.2e}, "
              f"99th percentile {np.percentile(a, 99):.2e}, largest {a.max():.2e}, above 5e-3 {np.mean(a > 5e-3):.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
