#!/usr/bin/env python3
"""Creation time of a GPU layer from CUDA tensors (flashmoe.MoELayer): bf16, and fp8 from bf16 experts (quantized
at creation: on the GPU, or with FLASHMOE_FP8_QUANTIZER=host on the host) and from float8_e4m3fn codes with block
scales (docs/fp8.md). Each is created `--repeat` times after one warm-up creation (which also compiles or loads the
kernel); the median wall time is printed, with the layer's weight bytes.

Usage (GPU host, torch; lib/libflashmoe.so or $FLASHMOE_LIB):
  PYTHONPATH=python python3 Benchmarks/fp8_create_bench.py [--shape qwen3] [--repeat 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import flashmoe

SHAPES = {  # hidden, intermediate, experts, top_k
    "qwen3": (2048, 768, 128, 8),      # Qwen3-30B-A3B
    "deepseek": (7168, 2048, 256, 8),  # DeepSeek-V3 (routed experts only)
    "small": (1024, 512, 32, 4),
}


def quantize(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, R, C] bf16 -> (float8_e4m3fn codes, float32 scales [E, ceil(R/128), ceil(C/128)]) on the GPU, with
    DeepSeek-V3's rule (scale = amax / 448), an expert at a time (a DeepSeek-V3-sized tensor in FP32 at once would
    not fit beside the layers). Only the speed of creation is measured here, not the bits."""
    e, r, c = t.shape
    pr, pc = -r % 128, -c % 128
    codes = torch.empty((e, r, c), dtype=torch.float8_e4m3fn, device=t.device)
    scales = torch.empty((e, (r + pr) // 128, (c + pc) // 128), dtype=torch.float32, device=t.device)
    for x in range(e):
        v = torch.nn.functional.pad(t[x].float(), (0, pc, 0, pr)).view((r + pr) // 128, 128, (c + pc) // 128, 128)
        scale = (v.abs().amax(dim=(1, 3)) / 448).clamp_min(1e-30)
        codes[x] = (v / scale[:, None, :, None]).to(torch.float8_e4m3fn).view(r + pr, c + pc)[:r, :c]
        scales[x] = scale
    return codes, scales


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="qwen3", choices=sorted(SHAPES))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json")
    p.add_argument("--cases", default="bf16,fp8 from bf16,fp8 from E4M3",
                   help="comma-separated: which layers to create (DeepSeek-V3's bf16 layer and its inputs do not fit "
                        "an 80 GB GPU together)")
    args = p.parse_args()
    os.environ["FLASHMOE_EXPERIMENTAL_FP8"] = "1"
    h, i, e, k = SHAPES[args.shape]
    g = torch.Generator(device="cuda").manual_seed(1)

    def u(*shape):
        # An expert at a time: made whole, a DeepSeek-V3 stack's FP32 temporaries (30 GB for gate_up) left 22.6 GiB
        # of an H100 free beside the inputs, even after torch.cuda.empty_cache().
        t = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
        for x in range(shape[0]):
            t[x] = ((torch.rand(shape[1:], generator=g, device="cuda") * 2 - 1) / shape[-1] ** 0.5).to(torch.bfloat16)
        return t

    router, gate_up, down = u(e, h), u(e, 2 * i, h), u(e, h, i)
    (gu, gus), (d, ds) = quantize(gate_up), quantize(down)
    base = flashmoe.MoEConfig(hidden=h, intermediate=i, experts=e, top_k=k, max_tokens=4096)
    cases = {
        "bf16": (base.replace(precision="bf16"), {"router": router, "gate_up": gate_up, "down": down}),
        "fp8 from bf16": (base.replace(precision="fp8"), {"router": router, "gate_up": gate_up, "down": down}),
        "fp8 from E4M3": (base.replace(precision="fp8"),
                          {"router": router, "gate_up": gu, "gate_up_scale": gus, "down": d, "down_scale": ds}),
    }
    results = {}
    print(f"{args.shape}: H={h} I={i} E={e}, {torch.cuda.get_device_name()}, {os.cpu_count()} CPUs", flush=True)
    for name, (cfg, weights) in cases.items():
        if name not in args.cases.split(","):
            continue
        times, info = [], {}
        for rep in range(args.repeat + 1):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            layer = flashmoe.MoELayer(cfg, weights)
            torch.cuda.synchronize()
            if rep:
                times.append(time.perf_counter() - t0)
            info = layer.info()
            layer.close()
        results[name] = {"median_s": statistics.median(times), "runs_s": times, "weight_bytes": info["weight_bytes"]}
        print(f"  {name:<14} median {statistics.median(times):.3f} s over {len(times)} "
              f"(runs {', '.join(f'{t:.3f}' for t in times)}), weight bytes {info['weight_bytes'] / 2**20:.0f} MiB",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": args.shape, "device": torch.cuda.get_device_name(), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
