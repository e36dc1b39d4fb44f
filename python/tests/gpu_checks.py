#!/usr/bin/env python3
"""The GPU checks of the Python package (issue 10, item 5), run by scripts/gpu-python on a host with a CUDA GPU,
torch and transformers:

- families-fp32: tiny random models of each family (python/tests/hf_models.py), fp32 on the GPU: patched vs
  original logits within 1e-5 (relative, Frobenius), and greedy generate of 32 tokens identical.
- families-bf16: the same models in bf16: patched vs original logits within 2e-2.
- graph-replays: a MoELayer captured in a CUDA graph (with and without the routing outputs), replayed 100 times
  with new inputs: equal (bitwise) to eager.
- compile-fullgraph / compile-cudagraphs / compile-model: torch.compile(fullgraph=True) of a function around a
  MoELayer (inductor, S = 7, 64, 200; then mode="reduce-overhead"), and of a patched tiny model's forward
  (aot_eager); equal to eager.
- two-streams: two layers run at once on two streams, 20 calls each, equal (bitwise) to eager on one stream.
- kernel-fault: a layer built with FLASHMOE_FLAG_INJECT_FAULT (its first forward faults) raises FlashMoEKernelError
  from check(), from the next forward, at once with sync_errors, and from check() after a graph replay; the call
  after a fault runs and equals a healthy layer's result, which is unchanged by the faults.
- bad-inputs: wrong device, dtype, shape, alignment, contiguity, too many tokens, a stream of another device (or,
  with one GPU, a CUDA stream for a CPU layer), a closed layer: each raises TypeError/ValueError naming the argument.
- opcheck: torch.library.opcheck of flashmoe::moe_forward, moe_forward_y and moe_forward_out on CUDA; y of
  moe_forward_y and the outputs of moe_forward_out equal (bitwise) moe_forward's.
- fp8: one precision="fp8" layer from bf16 CUDA experts, from float8_e4m3fn codes with block scales (fused and
  separate) and on the CPU backend: the GPU layers equal bit for bit, within 5e-2 of the CPU; a graph replay.
- fp8-patch: tiny DeepSeek-V3 and Qwen3-MoE models (H = 256, I = 384) whose MoE blocks hold float8 experts with
  `*_scale_inv` block scales, as transformers' fine-grained FP8 holds them, patched, run on the CPU, then moved to
  the GPU (model.cuda() rebuilds the layers there): the block on 256 tokens routes at least 95 % of them as the CPU
  does and is within 5e-2 of it on those; logits finite (their errors against the CPU and the bf16 model reported).

Usage: PYTHONPATH=python python3 python/tests/gpu_checks.py [--json FILE] [--only NAME,...]
Prints one line per check as it ends, then a table; exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import flashmoe  # noqa: E402
from flashmoe import torch_op  # noqa: E402

FP32_TOL = 1e-5
BF16_TOL = 2e-2
CHECKS: list = []


class CheckFailed(AssertionError):
    """A check's expectation did not hold; `detail` is what the check measured up to there."""

    def __init__(self, message: str, detail: dict | None = None):
        super().__init__(message)
        self.detail = detail or {}


def expect(cond: bool, message: str, detail: dict | None = None) -> None:
    if not cond:
        raise CheckFailed(message, detail)


def check(fn):
    CHECKS.append(fn)
    return fn


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def random_layer(seed: int, *, hidden=512, inter=256, experts=16, top_k=4, max_tokens=256, dtype=torch.bfloat16,
                 **options) -> flashmoe.MoELayer:
    g = torch.Generator(device="cuda").manual_seed(seed)

    def u(*shape):
        return ((torch.rand(shape, generator=g, device="cuda") * 2 - 1) / shape[-1] ** 0.5).to(dtype)

    cfg = flashmoe.MoEConfig(hidden=hidden, intermediate=inter, experts=experts, top_k=top_k, max_tokens=max_tokens,
                             **options)
    return flashmoe.MoELayer(cfg, {"router": u(experts, hidden), "gate_up": u(experts, 2 * inter, hidden),
                                   "down": u(experts, hidden, inter)})


# ---------------------------------------------------------------------------------------------------------------------
# transformers models


def _each_family(seed: int, case) -> dict:
    """Runs `case(model, ids) -> (detail, ok)` on a fresh tiny float32 GPU model of each family, under no_grad, and
    unpatches it afterwards; raises CheckFailed naming the families whose case was not ok."""
    from hf_models import FAMILIES, tiny_model

    detail, failures = {}, []
    for i, family in enumerate(FAMILIES):
        model = tiny_model(family, seed + i, device="cuda")
        ids = torch.randint(0, model.config.vocab_size, (2, 16), device="cuda",
                            generator=torch.Generator("cuda").manual_seed(seed + i))
        try:
            with torch.no_grad():
                detail[family], ok = case(model, ids)
        except Exception as e:  # noqa: BLE001 - one family's failure must not hide the others'
            detail[family], ok = {"error": f"{type(e).__name__}: {e}"[:400]}, False
        finally:
            flashmoe.unpatch(model)
        if not ok:
            failures.append(family)
        del model
    expect(not failures, f"failed: {failures}", detail)
    return detail


@check
def families_fp32() -> dict:
    gen_args = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False)

    def case(model, ids):
        ref = model(ids).logits
        ref_tokens = model.generate(ids[:1, :8], **gen_args)
        names = flashmoe.patch(model)
        got = model(ids).logits
        tokens = model.generate(ids[:1, :8], **gen_args)
        err, same = rel(got, ref), torch.equal(tokens, ref_tokens)
        first_diff = None if same else int((tokens != ref_tokens).nonzero()[0, 1])
        return ({"blocks": len(names), "logits_rel_error": err, "generate_identical": same,
                 "first_differing_position": first_diff}, bool(names) and err < FP32_TOL and same)

    return _each_family(300, case)


@check
def families_bf16() -> dict:
    def case(model, ids):
        ref32 = model(ids).logits
        model.to(torch.bfloat16)
        ref = model(ids).logits
        flashmoe.patch(model)
        got = model(ids).logits
        err = rel(got, ref)
        return ({"patched_vs_original": err, "original_bf16_vs_fp32": rel(ref, ref32),
                 "patched_bf16_vs_fp32": rel(got, ref32)}, err < BF16_TOL)

    return _each_family(400, case)


# ---------------------------------------------------------------------------------------------------------------------
# graphs, compile, streams


@check
def graph_replays() -> dict:
    layer = random_layer(1)
    tokens = 200
    static_x = torch.randn(tokens, 512, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            layer(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph, graph_y = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y, static_ids, static_w = layer(static_x, return_routing=True)
    with torch.cuda.graph(graph_y):  # the y-only op (moe_forward_y), what layer(x) runs
        static_y_only = layer(static_x)
    mismatches, worst = 0, 0.0
    gen = torch.Generator("cuda").manual_seed(2)
    for _ in range(100):
        x = torch.randn(tokens, 512, device="cuda", dtype=torch.bfloat16, generator=gen)
        static_x.copy_(x)
        graph.replay()
        graph_y.replay()
        y, ids, w = layer(x, return_routing=True)
        if not (torch.equal(static_y, y) and torch.equal(static_ids, ids) and torch.equal(static_w, w)
                and torch.equal(static_y_only, y)):
            mismatches += 1
            worst = max(worst, rel(static_y, y), rel(static_y_only, y))
    torch.cuda.synchronize()
    layer.check()
    expect(mismatches == 0, f"{mismatches} of 100 replays differ from eager (worst relative error {worst:.2e})")
    return {"replays": 100, "tokens": tokens, "mismatches": mismatches}


@check
def compile_fullgraph() -> dict:
    layer = random_layer(3)

    def f(x):
        return layer(x * 0.5) + x

    compiled = torch.compile(f, fullgraph=True)
    detail = {}
    for tokens in (7, 64, 200):
        x = torch.randn(tokens, 512, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            a, b = compiled(x), f(x)
        detail[f"S={tokens}"] = rel(a, b)
        expect(rel(a, b) < 1e-2, f"S={tokens}: compiled vs eager relative error {rel(a, b):.2e}")
    return detail


@check
def compile_cudagraphs() -> dict:
    layer = random_layer(4)

    def f(x):
        return layer(x) * 2.0

    compiled = torch.compile(f, mode="reduce-overhead", fullgraph=True)
    worst = 0.0
    for i in range(6):  # the first calls record, the later ones replay the graph
        x = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            a = compiled(x).clone()
            b = f(x)
        worst = max(worst, rel(a, b))
    expect(worst < 1e-2, f"compiled (reduce-overhead) vs eager relative error {worst:.2e}")
    return {"calls": 6, "worst_rel_error": worst}


@check
def compile_model() -> dict:
    from hf_models import tiny_model

    model = tiny_model("qwen3_moe", 500, device="cuda")
    ids = torch.randint(0, model.config.vocab_size, (2, 16), device="cuda")
    flashmoe.patch(model)

    def forward(input_ids):
        return model(input_ids=input_ids, use_cache=False).logits

    # aot_eager: the whole model traced in one graph (dynamo + the op's fake) without inductor's compile time;
    # inductor itself is exercised by compile-fullgraph and compile-cudagraphs.
    compiled = torch.compile(forward, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        a, b = compiled(ids), forward(ids)
    err = rel(a, b)
    expect(err < FP32_TOL * 10, f"compiled patched model vs eager: relative error {err:.2e}")
    return {"rel_error": err}


@check
def two_streams() -> dict:
    layers = [random_layer(10), random_layer(11)]
    gen = torch.Generator("cuda").manual_seed(12)
    inputs = [[torch.randn(128, 512, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(20)]
              for _ in layers]
    with torch.no_grad():
        refs = [[layer(x) for x in xs] for layer, xs in zip(layers, inputs)]
    torch.cuda.synchronize()
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    outs = [[], []]
    for i in range(20):
        for j, (layer, s) in enumerate(zip(layers, streams)):
            with torch.cuda.stream(s):
                outs[j].append(layer(inputs[j][i]))
    for s in streams:
        torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    for layer in layers:
        layer.check()
    bad = sum(not torch.equal(o, r) for j in range(2) for o, r in zip(outs[j], refs[j]))
    expect(bad == 0, f"{bad} of 40 calls on two streams differ from eager")
    return {"calls": 40, "mismatches": bad}


# ---------------------------------------------------------------------------------------------------------------------
# errors


def _raises(exc, fn, *args, **kwargs) -> BaseException:
    try:
        fn(*args, **kwargs)
    except exc as e:
        return e
    except Exception as e:  # noqa: BLE001
        raise CheckFailed(f"{getattr(fn, '__name__', fn)}: expected {exc.__name__}, got {type(e).__name__}: {e}")
    raise CheckFailed(f"{getattr(fn, '__name__', fn)}: expected {exc.__name__}, nothing raised")


@check
def kernel_fault() -> dict:
    """FLASHMOE_FLAG_INJECT_FAULT makes a layer's first forward skip a publication, so a device wait times out
    (after wait_budget_ms); later forwards run normally. Each faulty layer below has the healthy one's weights."""
    healthy = random_layer(20)
    x = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16)
    before = healthy(x).clone()

    def faulty(**options):
        return random_layer(20, inject_fault=True, wait_budget_ms=100, **options)

    detail = {}
    a = faulty()
    t0 = time.time()
    a(x)  # enqueued; the fault is found on the device
    err = _raises(flashmoe.FlashMoEKernelError, a.check, True)
    detail["check"] = {"seconds": round(time.time() - t0, 3), "message": str(err)[:300]}
    expect(err.status == 5, f"status {err.status}, expected FLASHMOE_ERROR_KERNEL (5)")
    after_fault = a(x)  # the next call runs, and right
    expect(torch.equal(after_fault, before), "the call after the fault differs from the healthy layer's")

    b = faulty()
    b(x)
    torch.cuda.synchronize()
    detail["next_forward"] = str(_raises(flashmoe.FlashMoEKernelError, b, x))[:200]
    expect(torch.equal(b(x), before), "the call after the reported fault differs from the healthy layer's")

    c = faulty(sync_errors=True)
    detail["sync_errors"] = str(_raises(flashmoe.FlashMoEKernelError, c, x))[:200]

    d = faulty()
    graph = torch.cuda.CUDAGraph()
    static_x = x.clone()
    with torch.cuda.graph(graph):
        d(static_x)  # the layer's first forward: captured with the fault
    graph.replay()
    torch.cuda.synchronize()
    detail["after_graph_replay"] = str(_raises(flashmoe.FlashMoEKernelError, d.check))[:200]

    after = healthy(x)
    torch.cuda.synchronize()
    expect(torch.equal(before, after), "a healthy layer's result changed after the faults")
    for layer in (a, b, c, d, healthy):
        layer.close()
    return detail


@check
def bad_inputs() -> dict:
    layer = random_layer(30, max_tokens=64)
    x = torch.randn(16, 512, device="cuda", dtype=torch.bfloat16)
    cases = {
        "x on the CPU": (ValueError, ["x", "cuda:0"], lambda: layer(x.cpu())),
        "x float32": (TypeError, ["x", "bfloat16", "float32"], lambda: layer(x.float())),
        "x wrong H": (ValueError, ["x", "512"], lambda: layer(x[:, :256].contiguous())),
        "x not contiguous": (ValueError, ["x", "contiguous"],  # the right shape [16, 512], every other column
                             lambda: layer(torch.randn(16, 1024, device="cuda", dtype=torch.bfloat16)[:, ::2])),
        "x misaligned": (ValueError, ["x", "aligned"],
                         lambda: layer(torch.empty(16 * 512 + 1, device="cuda", dtype=torch.bfloat16)[1:]
                                       .view(16, 512))),
        "too many tokens": (ValueError, ["x", "max_tokens", "64"],
                            lambda: layer(torch.zeros(65, 512, device="cuda", dtype=torch.bfloat16))),
        "op with a bad layer id": (ValueError, ["layer", "id"], lambda: torch_op.moe_forward(x, 10**9)),
        "stream not a Stream": (TypeError, ["stream"], lambda: layer(x, stream=0)),
    }
    if torch.cuda.device_count() > 1:
        other = torch.cuda.Stream(device=1)
        cases["stream of another device"] = (ValueError, ["stream", "cuda:1", "cuda:0"],
                                             lambda: layer(x, stream=other))
    else:
        cpu_layer = flashmoe.MoELayer(layer.config, {"router": torch.zeros(16, 512), "gate_up": torch.zeros(
            16, 512, 512), "down": torch.zeros(16, 512, 256)})
        cases["CUDA stream for a CPU layer"] = (ValueError, ["stream", "CPU"],
                                                lambda: cpu_layer(x.float().cpu(), stream=torch.cuda.Stream()))
        cases["CUDA x for a CPU layer"] = (ValueError, ["x", "cpu", "cuda:0"], lambda: cpu_layer(x.float()))
    closed = random_layer(31)
    closed.close()
    cases["closed layer"] = (ValueError, ["closed"], lambda: closed(x))
    detail = {}
    for name, (exc, words, fn) in cases.items():
        err = _raises(exc, fn)
        missing = [w for w in words if w not in str(err)]
        expect(not missing, f"{name}: message {str(err)!r} lacks {missing}")
        detail[name] = f"{type(err).__name__}: {err}"[:160]
    y = layer(x)  # still works
    torch.cuda.synchronize()
    expect(bool(torch.isfinite(y).all()), "the layer gave non-finite output after the refused calls")
    if torch.cuda.device_count() == 1:
        detail["note"] = "one GPU: 'a stream of another device' checked as a CUDA stream for a CPU layer"
    return detail


@check
def opcheck() -> dict:
    layer = random_layer(40)
    x = torch.randn(32, 512, device="cuda", dtype=torch.bfloat16)
    lid = layer.layer_id
    torch.library.opcheck(torch_op.moe_forward, (x, lid))
    torch.library.opcheck(torch_op.moe_forward_y, (x, lid))
    y, ids, w = torch_op.moe_forward(x, lid)
    outs = (torch.full_like(y, float("nan")), torch.full_like(ids, -7), torch.full_like(w, float("nan")))
    torch.library.opcheck(torch_op.moe_forward_out, (x, lid, *outs))
    torch_op.moe_forward_out(x, lid, *outs)
    y_only = torch_op.moe_forward_y(x, lid)
    torch.cuda.synchronize()
    expect(torch.equal(y_only, y), "moe_forward_y's y differs from moe_forward's", {"rel": rel(y_only, y)})
    for name, got, want in zip(("y", "topk_ids", "topk_weights"), outs, (y, ids, w)):
        expect(torch.equal(got, want), f"moe_forward_out's {name} differs from moe_forward's")
    layer.close()
    return {"ops": "flashmoe::moe_forward, moe_forward_y, moe_forward_out", "device": "cuda",
            "y_only_equal": True, "out_equal": True}


@check
def fp8() -> dict:
    """precision "fp8" (FLASHMOE_EXPERIMENTAL_FP8=1): one layer from bf16 CUDA experts (quantized at creation), from
    float8_e4m3fn codes with block scales (fused and separate layouts, quantized here by the library's rule), and on
    the CPU backend. The GPU layers' y must be equal bit for bit; each within 5e-2 of the CPU layer (the FP8 MMA's
    tolerance, docs/fp8.md); a graph replay equals eager. S = 1 (decode kernel), 77 and 256 (prefill)."""
    import os

    import numpy as np
    import reference
    from hf_models import codes_and_scales

    os.environ["FLASHMOE_EXPERIMENTAL_FP8"] = "1"
    h, i, e, k, si = 512, 256, 16, 4, 128
    rng = np.random.default_rng(50)

    def blocky(*shape):
        return torch.from_numpy(reference.blocky(rng, shape)).to(torch.bfloat16)

    w = {"router": blocky(e, h), "gate": blocky(e, i, h), "up": blocky(e, i, h), "down": blocky(e, h, i),
         "shared_gate_up": blocky(2 * si, h), "shared_down": blocky(h, si)}
    cfg = flashmoe.MoEConfig(hidden=h, intermediate=i, experts=e, top_k=k, shared_intermediate=si, max_tokens=256,
                             precision="fp8")
    gate_up = torch.cat([w["gate"], w["up"]], dim=1)
    bf16 = {"router": w["router"], "gate_up": gate_up, "down": w["down"], "shared_gate_up": w["shared_gate_up"],
            "shared_down": w["shared_down"]}

    (gu, gus), (g, gs), (u, us), (d, ds) = map(codes_and_scales, (gate_up, w["gate"], w["up"], w["down"]))
    fused = {**bf16, "gate_up": gu, "gate_up_scale": gus, "down": d, "down_scale": ds}
    shared_split = {"shared_gate_up": w["shared_gate_up"][:si], "shared_up": w["shared_gate_up"][si:]}
    separate = {"router": w["router"], "gate": g, "up": u, "down": d, "gate_scale": gs, "up_scale": us,
                "down_scale": ds, "shared_down": w["shared_down"], **shared_split}
    cuda = lambda ws: {n: t.cuda() for n, t in ws.items()}  # noqa: E731
    layers = {"bf16 experts": flashmoe.MoELayer(cfg, cuda(bf16)), "E4M3 fused": flashmoe.MoELayer(cfg, cuda(fused)),
              "E4M3 separate": flashmoe.MoELayer(cfg, cuda(separate))}
    cpu = flashmoe.MoELayer(cfg, bf16)
    detail = {}
    for tokens in (1, 77, 256):
        x = blocky(tokens, h)
        ys = {name: layer(x.cuda()) for name, layer in layers.items()}
        torch.cuda.synchronize()
        want = cpu(x)
        first = ys["bf16 experts"]
        for name, y in ys.items():
            expect(torch.equal(y, first), f"S={tokens}: {name}'s y differs from bf16 experts'",
                   {"rel": rel(y.float(), first.float())})
        err = rel(first.float().cpu(), want)
        expect(bool(torch.isfinite(first).all()) and err < 5e-2, f"S={tokens}: GPU fp8 vs CPU fp8 {err:.3g}")
        detail[f"S={tokens}"] = {"gpu_vs_cpu": round(err, 5)}
    layer = layers["E4M3 fused"]
    x = torch.zeros(77, h, dtype=torch.bfloat16, device="cuda")
    eager = layer(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)
    for _ in range(3):
        x.copy_(blocky(77, h).cuda())
        graph.replay()
        torch.cuda.synchronize()
        eager = layer(x)
        expect(torch.equal(y, eager), "fp8 graph replay differs from eager")
    detail["weight_bytes"] = layer.native.info()["weight_bytes"]
    for l in (*layers.values(), cpu):
        l.close()
    return detail


@check
def fp8_patch() -> dict:
    import os

    from hf_models import make_fp8_experts, moe_blocks, tiny_model

    os.environ["FLASHMOE_EXPERIMENTAL_FP8"] = "1"
    detail = {}
    for i, family in enumerate(("deepseek_v3", "qwen3_moe")):
        # H and I multiples of 128, as FP8 checkpoints have them (scripts/transformers_fp8.py, FP8_SIZES).
        model = tiny_model(family, 600 + i, dtype=torch.bfloat16, hidden=256, inter=384, shared=384)
        ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(600 + i))
        x = torch.randn(256, 256, generator=torch.Generator().manual_seed(700 + i)).to(torch.bfloat16)
        with torch.no_grad():
            bf16 = model(ids).logits.float()
            for block in moe_blocks(model):
                make_fp8_experts(block)
            names = flashmoe.patch(model)
            layer = model.get_submodule(names[0]).flashmoe
            cpu = model(ids).logits.float()
            y_cpu, ids_cpu, _ = layer(x, return_routing=True)
            model.cuda()  # the patched blocks' layers are rebuilt on the GPU from the moved FP8 parameters
            gpu = model(ids.cuda()).logits.float().cpu()
            y_gpu, ids_gpu, _ = layer(x.cuda(), return_routing=True)
        flashmoe.unpatch(model)
        # The block on the same x: tokens routed alike (a near tie of router logits may flip between the backends)
        # within the FP8 MMA's tolerance (docs/fp8.md).
        same = (ids_cpu.sort(dim=1).values == ids_gpu.cpu().sort(dim=1).values).all(dim=1)
        y_gpu = y_gpu.float().cpu()
        err = rel(y_gpu[same], y_cpu.float()[same]) if same.any() else float("inf")
        detail[family] = {"blocks": len(names), "routed_alike": f"{int(same.sum())}/{len(same)}",
                          "block_gpu_vs_cpu": round(err, 5), "logits_gpu_vs_cpu": round(rel(gpu, cpu), 5),
                          "logits_gpu_vs_bf16": round(rel(gpu, bf16), 5), "logits_cpu_vs_bf16": round(rel(cpu, bf16), 5)}
        expect(bool(torch.isfinite(gpu).all()) and bool(torch.isfinite(y_gpu).all()), f"{family}: non-finite", detail)
        expect(float(same.float().mean()) >= 0.95, f"{family}: routing differs on over 5 % of tokens", detail)
        expect(err < 5e-2, f"{family}: the GPU fp8 block vs the CPU's", detail)
        del model
    return detail


# ---------------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--only", default="", help="comma list of check names (default: all)")
    args = p.parse_args(argv)
    only = {n.strip().replace("-", "_") for n in args.only.split(",") if n.strip()}
    if not torch.cuda.is_available():
        print("error: no CUDA GPU visible to torch", flush=True)
        return 2
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.cuda.get_device_name()}, "
          f"{torch.cuda.device_count()} GPU(s), lib {flashmoe.library_path()}", flush=True)
    results = []
    for fn in CHECKS:
        if only and fn.__name__ not in only:
            continue
        name = fn.__name__.replace("_", "-")
        t0 = time.time()
        try:
            detail, status = fn(), "PASS"
        except Exception as e:  # noqa: BLE001 - one failing check must not stop the others
            detail = dict(getattr(e, "detail", None) or {})
            detail.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-2000:])
            status = "FAIL"
        seconds = time.time() - t0
        results.append({"check": name, "status": status, "seconds": round(seconds, 1), "detail": detail})
        print(f"{status} {name} ({seconds:.1f} s): {json.dumps(detail, default=str)[:1500]}", flush=True)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    print(f"\n{'check':<20} {'status':<6} {'seconds':>8}")
    for r in results:
        print(f"{r['check']:<20} {r['status']:<6} {r['seconds']:>8.1f}")
    failed = sum(r["status"] != "PASS" for r in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
