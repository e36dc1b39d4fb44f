#!/usr/bin/env python3
"""Host-side micro-benchmark of the torch front end's Python/ctypes work per call, without a GPU.

A small CPU-backend MoELayer is called through each path (op, op_y, op_out, module, module with routing) with
flashmoe_layer_forward replaced by a stub that returns success, so what is timed is only the work around the native
call: torch's dispatch into the op's Python kernel, the argument checks, the output allocations (CPU tensors here;
CUDA allocations cost more, see torch_op_bench.py's `breakdown` section on a GPU host) and the ctypes argument
handling up to the call. Best of --repeats timeit runs of --number calls, in µs per call.

Compare two checkouts by pointing --python at each one's python/ folder:
    PYTHONPATH=/path/to/cpu-torch python3 Benchmarks/torch_op_host.py [--python OTHER/python]
"""

from __future__ import annotations

import argparse
import os
import sys
import timeit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--python", default=os.path.join(ROOT, "python"), help="the python/ folder holding flashmoe")
    p.add_argument("--number", type=int, default=4000, help="calls per timeit run")
    p.add_argument("--repeats", type=int, default=30, help="timeit runs (the best is reported)")
    args = p.parse_args(argv)
    sys.path.insert(0, args.python)
    import torch

    import flashmoe
    from flashmoe import torch_op

    hidden, top_k = 256, 2
    cfg = flashmoe.MoEConfig(hidden=hidden, intermediate=128, experts=8, top_k=top_k, max_tokens=64)
    g = torch.Generator().manual_seed(0)
    weights = {"router": torch.randn(8, hidden, generator=g), "gate_up": torch.randn(8, 256, hidden, generator=g),
               "down": torch.randn(8, hidden, 128, generator=g)}
    layer = flashmoe.MoELayer(cfg, weights)
    lid = layer.layer_id
    bound = torch_op.lookup(lid)
    stub = lambda *a: 0  # noqa: E731 - flashmoe_layer_forward returning FLASHMOE_SUCCESS
    if hasattr(bound, "call"):
        bound.call = stub
    else:  # an older checkout: the op called NativeLayer.forward_raw, which called NativeLayer._forward
        bound.native._forward = stub
    op, op_out = torch.ops.flashmoe.moe_forward, torch.ops.flashmoe.moe_forward_out
    op_y = getattr(torch.ops.flashmoe, "moe_forward_y", None) if hasattr(torch_op, "moe_forward_y") else None
    print(f"flashmoe from {args.python}; torch {torch.__version__}; µs per call, the C call stubbed")
    for tokens in (1, 64):
        x = torch.randn(tokens, hidden)
        y, ids, w = (torch.empty(tokens, hidden), torch.empty(tokens, top_k, dtype=torch.int32),
                     torch.empty(tokens, top_k))
        paths = {"op": lambda: op(x, lid), "op_y": (lambda: op_y(x, lid)) if op_y else None,
                 "op_out": lambda: op_out(x, lid, y, ids, w), "module": lambda: layer(x),
                 "module+routing": lambda: layer(x, return_routing=True)}
        cells = []
        for name, fn in paths.items():
            if fn is None:
                cells.append(f"{name} -")
                continue
            best = min(timeit.repeat(fn, number=args.number, repeat=args.repeats)) / args.number * 1e6
            cells.append(f"{name} {best:.2f}")
        print(f"S = {tokens:>2}: " + ", ".join(cells))
    layer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
