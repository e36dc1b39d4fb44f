#!/usr/bin/env python3
"""Speed of FlashMoE from PyTorch (issue 10, item 6), on one GPU:

1. `overhead`: the cost of the Python layers over the bare kernel. Five ways to run the same layer: `bare` (the
   ctypes call flashmoe_layer_forward with preallocated outputs), `op` (torch.ops.flashmoe.moe_forward: checks,
   three output allocations, the current stream), `op_y` (torch.ops.flashmoe.moe_forward_y: y only, one
   allocation), `op_out` (torch.ops.flashmoe.moe_forward_out into kept outputs: no allocation), `module`
   (MoELayer.__call__: the weight-version check, then op_y). Two measures each: the GPU idle before every call and
   CUDA events around the one call (so the host work before the launch is in the number; the op's overhead =
   op − bare), and the host time per call of many back-to-back calls (perf_counter). Shapes: a tiny layer
   (S = 1, where the host dominates) and qwen3-30b-a3b decode (S = 64).
   `breakdown`: the same layers and paths, where the host time goes: perf_counter from the call to its
   flashmoe_layer_forward call (the host work that delays the launch, GPU idle before each call), the output
   allocations alone, the op with the C call stubbed (its own Python/torch work), and each path's idle overhead
   over `bare` with the two called alternately (so a drift of the kernel's own time cancels).
2. `decode`: qwen3-30b-a3b (H 2048, I 768, E 128, k 8, bf16), S = 64, through the op: back-to-back CUDA-event
   time per call against the bare kernel's and, when bin/flashmoe is present, against `flashmoe bench`.
3. `model`: a Qwen3-MoE model with Qwen3-30B-A3B's layer shapes (2 decoder layers, random weights, bf16, vocab
   --vocab), patched with flashmoe.patch against transformers' own MoE block with experts_implementation "eager"
   and each built-in one that runs here (grouped_mm, batched_mm; the fastest is reported): the MoE block alone and
   the whole model's forward, prefill 1 × 4096 tokens and decode batches 1 and 64 (one new token per sequence, no
   KV cache: the MoE block sees B rows). CUDA events, GPU idle before each call, median of --iters after --warmup.

Usage (GPU host, from the repository root, lib/libflashmoe.so present):
    PYTHONPATH=python python3 Benchmarks/torch_op_bench.py --json OUT/torch_op_bench.json
Prints one table per section and writes every number to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "python"))
sys.path.insert(0, HERE)

SECTIONS = ("overhead", "breakdown", "decode", "model")
QWEN3 = dict(hidden=2048, intermediate=768, experts=128, top_k=8)


def log(msg: str) -> None:
    print(msg, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma list of " + ", ".join(SECTIONS))
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=30, help="timed calls per case (median reported)")
    p.add_argument("--loop", type=int, default=200, help="back-to-back calls per host/loop measurement")
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary of the model section (small: the MoE "
                   "layers, not the LM head, are under test)")
    p.add_argument("--flashmoe", default=os.path.join(ROOT, "bin", "flashmoe"),
                   help="flashmoe CLI for the decode comparison (skipped when missing)")
    p.add_argument("--json", help="write every result here")
    args = p.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad:
        p.error(f"--sections: unknown {bad}; choose from {', '.join(SECTIONS)}")
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Timing


def idle_event_ms(torch, fn) -> float:
    """ms of CUDA events around one call of `fn`, the GPU idle before it (host work before the launch included)."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def idle_events_ms(torch, fn, warmup: int, iters: int) -> float:
    """Median ms of one call with the GPU idle before it (CUDA events around the call, host work included)."""
    for _ in range(warmup):
        fn()
    return statistics.median(idle_event_ms(torch, fn) for _ in range(iters))


def loop_events_ms(torch, fn, calls: int, repeats: int = 5) -> float:
    """Median over `repeats` of (CUDA-event time of `calls` back-to-back calls) / calls: the GPU-bound rate."""
    fn()
    torch.cuda.synchronize()
    per = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        per.append(start.elapsed_time(end) / calls)
    return statistics.median(per)


def host_us(torch, fn, calls: int, repeats: int = 5) -> float:
    """Median over `repeats` of host µs per call over `calls` calls (no synchronisation inside)."""
    fn()
    torch.cuda.synchronize()
    per = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        per.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(per)


# ---------------------------------------------------------------------------------------------------------------------
# Layers


def random_layer(torch, flashmoe, hidden, intermediate, experts, top_k, max_tokens, dtype, seed=0):
    """A MoELayer with nn.Linear-like random weights on cuda."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def u(*shape):
        return ((torch.rand(shape, generator=g, device="cuda") * 2 - 1) / shape[-1] ** 0.5).to(dtype)

    cfg = flashmoe.MoEConfig(hidden=hidden, intermediate=intermediate, experts=experts, top_k=top_k,
                             max_tokens=max_tokens)
    weights = {"router": u(experts, hidden), "gate_up": u(experts, 2 * intermediate, hidden),
               "down": u(experts, hidden, intermediate)}
    return flashmoe.MoELayer(cfg, weights)


def overhead_case(torch, layer, tokens: int, args) -> dict:
    x = torch.randn(tokens, layer.config.hidden, device="cuda").to(layer.storage_dtype)
    native = layer.native
    y = torch.empty(tokens, layer.config.hidden, device="cuda", dtype=layer.output_dtype)
    ids = torch.empty(tokens, layer.config.top_k, device="cuda", dtype=torch.int32)
    w = torch.empty(tokens, layer.config.top_k, device="cuda", dtype=torch.float32)
    stream = torch.cuda.current_stream().cuda_stream
    xp, yp, ip, wp = x.data_ptr(), y.data_ptr(), ids.data_ptr(), w.data_ptr()
    op, op_out = torch.ops.flashmoe.moe_forward, torch.ops.flashmoe.moe_forward_out
    lid = layer.layer_id
    op_y = torch.ops.flashmoe.moe_forward_y
    runs = {
        "bare": lambda: native.forward_raw(xp, yp, tokens, ip, wp, stream),
        "op": lambda: op(x, lid),
        "op_y": lambda: op_y(x, lid),
        "op_out": lambda: op_out(x, lid, y, ids, w),
        "module": lambda: layer(x),
    }
    out = {"tokens": tokens, "shape": f"H{layer.config.hidden} I{layer.config.intermediate} "
                                      f"E{layer.config.experts} k{layer.config.top_k}"}
    for name, fn in runs.items():
        out[f"{name}_idle_ms"] = idle_events_ms(torch, fn, args.warmup, args.iters * 3)
        out[f"{name}_loop_ms"] = loop_events_ms(torch, fn, args.loop)
        out[f"{name}_host_us"] = host_us(torch, fn, args.loop)
    for name in ("op", "op_y", "op_out", "module"):
        out[f"{name}_overhead_us"] = (out[f"{name}_idle_ms"] - out["bare_idle_ms"]) * 1e3
    return out


def section_overhead(torch, flashmoe, args) -> list[dict]:
    rows = []
    tiny = random_layer(torch, flashmoe, 256, 128, 8, 2, 64, torch.bfloat16, seed=1)
    rows.append(overhead_case(torch, tiny, 1, args))
    tiny.close()
    qwen = random_layer(torch, flashmoe, **QWEN3, max_tokens=64, dtype=torch.bfloat16, seed=2)
    rows.append(overhead_case(torch, qwen, 64, args))
    qwen.close()
    log("\n## overhead of the Python layers (bf16; idle = GPU idle before each call, events around it)")
    log(f"{'shape':<22} {'S':>3} {'bare idle':>10} {'op-bare':>8} {'op_y-bare':>10} {'op_out-bare':>12} "
        f"{'module-bare':>12} {'host bare':>10} {'host op':>8} {'host op_y':>10} {'host op_out':>12} "
        f"{'host module':>12}")
    for r in rows:
        log(f"{r['shape']:<22} {r['tokens']:>3} {r['bare_idle_ms'] * 1e3:>8.1f}µs {r['op_overhead_us']:>6.1f}µs "
            f"{r['op_y_overhead_us']:>8.1f}µs {r['op_out_overhead_us']:>10.1f}µs {r['module_overhead_us']:>10.1f}µs "
            f"{r['bare_host_us']:>8.1f}µs {r['op_host_us']:>6.1f}µs {r['op_y_host_us']:>8.1f}µs "
            f"{r['op_out_host_us']:>10.1f}µs {r['module_host_us']:>10.1f}µs")
    return rows


def prelaunch_us(torch, fn, target, attr: str, iters: int) -> float:
    """Median µs from calling `fn` to its call of the C function `target.attr` (flashmoe_layer_forward, which
    launches the kernel), the GPU idle before each call: the host work that delays the kernel, measured directly."""
    real = getattr(target, attr)
    mark = [0.0]

    def probe(*a):
        mark[0] = time.perf_counter()
        return real(*a)

    setattr(target, attr, probe)
    try:
        fn()
        per = []
        for _ in range(iters):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            per.append(mark[0] - t0)
    finally:
        setattr(target, attr, real)
    torch.cuda.synchronize()
    return statistics.median(per) * 1e6


def interleaved_overhead_us(torch, fn, bare, iters: int) -> float:
    """Median over `iters` of (idle-GPU event time of `fn` − that of `bare`), the two called alternately, so that a
    drift of the kernel's own time (clocks, temperature) over the run cancels instead of landing in the difference."""
    fn()
    bare()
    return statistics.median((idle_event_ms(torch, fn) - idle_event_ms(torch, bare)) * 1e3 for _ in range(iters))


def breakdown_case(torch, flashmoe, layer, tokens: int, args) -> dict:
    """Where the op's host time goes, for one layer and S: the pre-launch host time of each path, the cost of the
    output allocations, and the op's host time with the C call replaced by a stub (pure Python/torch work)."""
    from flashmoe import torch_op

    c = layer.config
    x = torch.randn(tokens, c.hidden, device="cuda").to(layer.storage_dtype)
    native, bound = layer.native, torch_op.lookup(layer.layer_id)
    y = torch.empty(tokens, c.hidden, device="cuda", dtype=layer.output_dtype)
    ids = torch.empty(tokens, c.top_k, device="cuda", dtype=torch.int32)
    w = torch.empty(tokens, c.top_k, device="cuda", dtype=torch.float32)
    stream = torch.cuda.current_stream().cuda_stream
    xp, yp, ip, wp = x.data_ptr(), y.data_ptr(), ids.data_ptr(), w.data_ptr()
    op, op_y, op_out = (torch.ops.flashmoe.moe_forward, torch.ops.flashmoe.moe_forward_y,
                        torch.ops.flashmoe.moe_forward_out)
    lid, iters = layer.layer_id, args.iters * 3
    out = {"tokens": tokens, "shape": f"H{c.hidden} I{c.intermediate} E{c.experts} k{c.top_k}",
           "bare_prelaunch_us": prelaunch_us(torch, lambda: native.forward_raw(xp, yp, tokens, ip, wp, stream),
                                             native, "forward_function", iters)}
    bare = lambda: native.forward_raw(xp, yp, tokens, ip, wp, stream)  # noqa: E731
    for name, fn in {"op": lambda: op(x, lid), "op_y": lambda: op_y(x, lid),
                     "op_out": lambda: op_out(x, lid, y, ids, w), "module": lambda: layer(x)}.items():
        out[f"{name}_prelaunch_us"] = prelaunch_us(torch, fn, bound, "call", iters)
        out[f"{name}_interleaved_overhead_us"] = interleaved_overhead_us(torch, fn, bare, iters)
    dev, k = torch.device("cuda", torch.cuda.current_device()), c.top_k
    out["alloc_y_us"] = host_us(torch, lambda: torch.empty(tokens, c.hidden, dtype=layer.output_dtype, device=dev),
                                args.loop)
    out["alloc_outputs_us"] = host_us(torch, lambda: (
        torch.empty(tokens, c.hidden, dtype=layer.output_dtype, device=dev),
        torch.empty(tokens, k, dtype=torch.int32, device=dev), torch.empty(tokens, k, dtype=torch.float32, device=dev)),
        args.loop)
    real = bound.call
    bound.call = lambda *a: 0  # the C call stubbed: what is left is the op's own Python/torch work
    try:
        out["op_stub_host_us"] = host_us(torch, lambda: op(x, lid), args.loop)
        out["op_y_stub_host_us"] = host_us(torch, lambda: op_y(x, lid), args.loop)
    finally:
        bound.call = real
    return out


def section_breakdown(torch, flashmoe, args) -> list[dict]:
    rows = []
    tiny = random_layer(torch, flashmoe, 256, 128, 8, 2, 64, torch.bfloat16, seed=1)
    rows.append(breakdown_case(torch, flashmoe, tiny, 1, args))
    tiny.close()
    qwen = random_layer(torch, flashmoe, **QWEN3, max_tokens=64, dtype=torch.bfloat16, seed=2)
    rows.append(breakdown_case(torch, flashmoe, qwen, 64, args))
    qwen.close()
    log("\n## host time before the launch (GPU idle before each call; perf_counter from the call to "
        "flashmoe_layer_forward), allocations, and the op with the C call stubbed")
    log(f"{'shape':<22} {'S':>3} {'bare':>7} {'op':>7} {'op_y':>7} {'op_out':>7} {'module':>7} {'alloc y':>8} "
        f"{'alloc 3':>8} {'op stub':>8} {'op_y stub':>10}")
    for r in rows:
        log(f"{r['shape']:<22} {r['tokens']:>3} " + " ".join(
            f"{r[f'{n}_prelaunch_us']:>5.1f}µs" for n in ("bare", "op", "op_y", "op_out", "module")) +
            f" {r['alloc_y_us']:>6.1f}µs {r['alloc_outputs_us']:>6.1f}µs {r['op_stub_host_us']:>6.1f}µs "
            f"{r['op_y_stub_host_us']:>8.1f}µs")
    log("   over the bare call, called alternately with it (GPU idle before each call, events around it): " +
        "; ".join(f"S={r['tokens']}: " + ", ".join(f"{n} {r[f'{n}_interleaved_overhead_us']:+.1f}µs"
                                                   for n in ("op", "op_y", "op_out", "module")) for r in rows))
    return rows


def flashmoe_bench_ms(binary: str) -> float | None:
    """`flashmoe bench` of qwen3-30b-a3b S = 64 bf16 (median ms), or None without the binary."""
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        log(f"   ({binary} not found: no flashmoe bench comparison)")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.json")
        cmd = [binary, "bench", "--preset", "qwen3-30b-a3b", "--tokens", "64", "--precision", "bf16", "--json", path]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        if proc.returncode != 0:
            log(f"   flashmoe bench failed ({proc.returncode}): {proc.stderr.strip()[-400:]}")
            return None
        with open(path) as f:
            data = json.load(f)
        return float((data[0] if isinstance(data, list) else data)["median_ms"])


def section_decode(torch, flashmoe, args) -> dict:
    layer = random_layer(torch, flashmoe, **QWEN3, max_tokens=64, dtype=torch.bfloat16, seed=3)
    x = torch.randn(64, 2048, device="cuda", dtype=torch.bfloat16)
    native = layer.native
    y = torch.empty(64, 2048, device="cuda", dtype=torch.bfloat16)
    ids = torch.empty(64, 8, device="cuda", dtype=torch.int32)
    w = torch.empty(64, 8, device="cuda", dtype=torch.float32)
    stream = torch.cuda.current_stream().cuda_stream
    bare = lambda: native.forward_raw(x.data_ptr(), y.data_ptr(), 64, ids.data_ptr(), w.data_ptr(), stream)  # noqa
    op = lambda: torch.ops.flashmoe.moe_forward(x, layer.layer_id)  # noqa: E731
    out = {"op_loop_ms": loop_events_ms(torch, op, args.loop // 4), "bare_loop_ms": loop_events_ms(torch, bare,
                                                                                                 args.loop // 4),
           "op_idle_ms": idle_events_ms(torch, op, args.warmup, args.iters),
           "bare_idle_ms": idle_events_ms(torch, bare, args.warmup, args.iters)}
    layer.close()
    torch.cuda.synchronize()
    out["flashmoe_bench_ms"] = flashmoe_bench_ms(args.flashmoe)
    ref = out["flashmoe_bench_ms"] or out["bare_idle_ms"]
    out["op_vs_reference"] = out["op_idle_ms"] / ref
    out["reference"] = "flashmoe bench" if out["flashmoe_bench_ms"] else "bare ctypes call (GPU idle before it)"
    out["within_5_percent"] = out["op_vs_reference"] <= 1.05
    log("\n## decode step: qwen3-30b-a3b S=64 bf16")
    log(f"op {out['op_idle_ms']:.3f} ms (idle GPU), {out['op_loop_ms']:.3f} ms/call back-to-back; bare "
        f"{out['bare_idle_ms']:.3f} / {out['bare_loop_ms']:.3f} ms; flashmoe bench "
        f"{out['flashmoe_bench_ms'] if out['flashmoe_bench_ms'] is not None else '-'} ms; op / {out['reference']} = "
        f"{out['op_vs_reference']:.3f} ({'within' if out['within_5_percent'] else 'NOT within'} 5 %)")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The model section


def qwen3_model(torch, vocab: int, experts_implementation: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen3_moe", hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        intermediate_size=6144, vocab_size=vocab, max_position_embeddings=8192, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16,
                                                 experts_implementation=experts_implementation)
    return model.eval()


def section_model(torch, flashmoe, args) -> dict:
    import transformers  # noqa: F401

    model = qwen3_model(torch, args.vocab, "eager")
    shapes = {"prefill-4096": (1, 4096), "decode-b1": (1, 1), "decode-b64": (64, 1)}
    inputs = {k: torch.randint(0, args.vocab, shape, device="cuda", generator=torch.Generator("cuda").manual_seed(i))
              for i, (k, shape) in enumerate(shapes.items())}
    hidden = {k: torch.randn(*shape, 2048, device="cuda", dtype=torch.bfloat16) for k, shape in shapes.items()}
    results: dict = {"vocab": args.vocab, "cases": {}}

    def measure(label: str) -> None:
        for case in shapes:
            with torch.no_grad():
                t_block = idle_events_ms(torch, lambda: model.model.layers[0].mlp(hidden[case]), args.warmup,
                                         args.iters)
                t_model = idle_events_ms(torch, lambda: model(inputs[case]), args.warmup, args.iters)
            results["cases"].setdefault(case, {})[label] = {"block_ms": t_block, "model_ms": t_model}
            log(f"   {label:<22} {case:<13} block {t_block:8.3f} ms   model {t_model:8.3f} ms")

    log("\n## Qwen3-30B-A3B layer shapes, 2 layers, bf16: transformers' MoE block vs flashmoe.patch")
    measure("transformers eager")
    for impl in ("grouped_mm", "batched_mm"):
        try:
            model.set_experts_implementation(impl)
            with torch.no_grad():
                model(inputs["decode-b1"])
            measure(f"transformers {impl}")
        except Exception as e:  # noqa: BLE001 - an implementation that does not run here is reported, not fatal
            log(f"   transformers {impl}: not usable here ({type(e).__name__}: {e})")
    model.set_experts_implementation("eager")
    with torch.no_grad():
        ref = model(inputs["prefill-4096"][:, :256]).logits.float()
        flashmoe.patch(model, max_tokens=4096)
        got = model(inputs["prefill-4096"][:, :256]).logits.float()
    results["patched_vs_eager_rel_error"] = float((got - ref).norm() / ref.norm())
    log(f"   patched vs eager logits (256 tokens): relative error {results['patched_vs_eager_rel_error']:.2e}")
    measure("flashmoe")

    builtin = [k for k in next(iter(results["cases"].values())) if k.startswith("transformers ")]
    log(f"\n{'case':<13} {'what':<6} {'eager':>9} {'fastest built-in':>24} {'flashmoe':>9} {'vs eager':>9} "
        f"{'vs fastest':>10}")
    for case, row in results["cases"].items():
        for what in ("block", "model"):
            key = f"{what}_ms"
            fastest = min((k for k in builtin if k in row), key=lambda k: row[k][key])
            fm, eager, best = row["flashmoe"][key], row["transformers eager"][key], row[fastest][key]
            row[f"{what}_speedup_vs_eager"] = eager / fm
            row[f"{what}_speedup_vs_fastest"] = best / fm
            row[f"{what}_fastest_builtin"] = fastest
            log(f"{case:<13} {what:<6} {eager:>7.3f}ms {fastest.removeprefix('transformers '):>12} {best:>9.3f}ms "
                f"{fm:>7.3f}ms {eager / fm:>8.2f}× {best / fm:>9.2f}×")
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    import flashmoe

    if not torch.cuda.is_available():
        log("error: no CUDA GPU visible to torch")
        return 2
    log(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, flashmoe lib {flashmoe.library_path()}")
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime(
        "%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    sections = {"overhead": section_overhead, "breakdown": section_breakdown, "decode": section_decode,
                "model": section_model}
    failed = 0
    for name in args.sections:
        t0 = time.time()
        try:
            results[name] = sections[name](torch, flashmoe, args)
        except Exception as e:  # noqa: BLE001 - report and go on with the next section
            import traceback

            traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            failed += 1
        log(f"   [{name}: {time.time() - t0:.0f} s]")
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
