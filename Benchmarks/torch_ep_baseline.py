#!/usr/bin/env python3
"""PyTorch expert-parallel (EP) baseline for FlashMoE's multi-GPU layer: one process per GPU, each holding T tokens
and E/N experts (contiguous blocks: rank r owns experts r·E/N ... (r+1)·E/N − 1).

One layer call on every rank:
  1. router GEMM + the preset's scoring and top-k (torch_moe_baseline's router; the router weights are replicated:
     every rank builds them from the same seed);
  2. the k slots of every token sorted by expert id (= by destination rank, the blocks being contiguous);
  3. per-expert counts exchanged with `all_to_all_single` (E/N counts to each rank), then ONE host sync that reads
     the send and receive counts, from which the split sizes come;
  4. the token rows sent with `all_to_all_single` (uneven splits), regrouped by local expert on the device;
  5. the local experts: bf16 with `torch._grouped_mm` (int32 cumulative offsets); TF32 (fp32 tensors, TF32 matmuls)
     with a per-expert loop over the host-known counts (torch._grouped_mm has no fp32 fast path: its fallback copies
     the offsets to the host and loops anyway); `--expert-impl` overrides;
  6. the results returned with `all_to_all_single` (the splits reversed), unpermuted, summed over the k slots with
     the routing weights (plus the shared expert, replicated, where the preset has one).

Timing: CUDA events around one whole layer call on every rank, `dist.barrier()` (then a device sync) before each
call, ≥ 5 warm-up calls, ≥ 20 timed calls rotating among ≥ 2 input sets; a call's time is the max over the ranks
(`all_reduce` MAX of the per-rank event times); median and min reported. `--check` first runs a small token count
and compares, on rank 0, every rank's output with a float64 single-process reference of the same layer.

GPU host (N = 1, 2, 4, 8):
  PYTHONUNBUFFERED=1 torchrun --standalone --nproc-per-node N Benchmarks/torch_ep_baseline.py --check --json ep.json
CPU, to test the logic without GPUs (gloo, per-expert matmul loop):
  torchrun --standalone --nproc-per-node 2 Benchmarks/torch_ep_baseline.py --backend gloo --device cpu \\
      --hidden 64 --inter 32 --tokens-per-gpu 128 --check
Without torchrun it runs as a single rank. Run `--help` for the options; tested against the API of torch 2.11.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import socket
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
import torch_moe_baseline as tmb  # noqa: E402  (imports without torch; its layer code is shared)
from benchlib import PRESETS, PresetSpec  # noqa: E402
from torch_moe_baseline import PRECISIONS, TOL_VS_FP64, BenchError, log  # noqa: E402

IMPL = "torch-ep"
EXPERT_IMPLS = ("auto", "grouped", "loop")
BACKENDS = ("nccl", "gloo")
DEFAULT_PRESETS = ("paper-e32", "paper-e64")


# ---------------------------------------------------------------------------------------------------------------
# Command line and bookkeeping (no torch needed: the unit tests exercise them on a machine without a GPU).


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time a PyTorch expert-parallel MoE layer (one process per GPU; launch with torchrun).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--presets", default=",".join(DEFAULT_PRESETS), help="comma list of presets")
    p.add_argument("--precisions", default=",".join(PRECISIONS),
                   help="comma list: tf32 (fp32 tensors, TF32 matmuls), bf16")
    p.add_argument("--tokens-per-gpu", default="8192", help="tokens T on every rank, comma list")
    p.add_argument("--experts", default=None,
                   help="expert counts E to run instead of each preset's own, comma list (expert scaling); "
                        "each must be divisible by the number of ranks")
    p.add_argument("--hidden", type=int, default=None, help="override the preset's hidden size H (quick tests)")
    p.add_argument("--inter", type=int, default=None, help="override the preset's expert intermediate size I")
    p.add_argument("--iterations", "--repeats", dest="repeats", type=int, default=20,
                   help="timed calls per case (median and min reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls per case before timing")
    p.add_argument("--input-sets", type=int, default=2, help="distinct random inputs per rank rotated through")
    p.add_argument("--expert-impl", default="auto", choices=EXPERT_IMPLS,
                   help="local experts: grouped (torch._grouped_mm), loop (per-expert matmuls); auto = grouped "
                        "for bf16 on CUDA, loop otherwise")
    p.add_argument("--check", action="store_true",
                   help="before timing each case: gather every rank's inputs and outputs on rank 0 and compare "
                        "with a float64 single-process layer; a failure skips that case's timing and makes the "
                        "exit status 1")
    p.add_argument("--check-tokens", type=int, default=96, help="tokens per rank of the --check run")
    p.add_argument("--seed", type=int, default=1234, help="seed of the weights and inputs")
    p.add_argument("--json", default=None, metavar="FILE", help="rank 0 writes the results as a JSON list to FILE")
    p.add_argument("--backend", default=None, choices=BACKENDS,
                   help="torch.distributed backend (default: nccl with --device cuda, gloo with cpu)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cuda: GPU LOCAL_RANK of every process; cpu: to test the logic without GPUs")
    args = p.parse_args(argv)
    try:
        args.presets = benchlib.parse_list(args.presets, list(PRESETS), "presets")
        args.precisions = benchlib.parse_list(args.precisions, PRECISIONS, "precisions")
        args.tokens_per_gpu = benchlib.parse_tokens(args.tokens_per_gpu, "--tokens-per-gpu")
        args.experts = benchlib.parse_tokens(args.experts, "--experts") if args.experts is not None else None
    except ValueError as e:
        p.error(str(e))
    benchlib.check_torch_run_args(p, args)
    for name in ("hidden", "inter"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name} must be >= 1, got {v}")
    if args.backend is None:
        args.backend = "nccl" if args.device == "cuda" else "gloo"
    if (args.backend == "nccl") != (args.device == "cuda"):
        p.error(f"--backend {args.backend} does not go with --device {args.device}: use nccl with cuda, "
                f"gloo with cpu")
    return args


def layer_spec(base: PresetSpec, experts: int | None, hidden: int | None, inter: int | None) -> PresetSpec:
    """The preset with the overrides applied; ValueError when the router cannot work with that many experts."""
    spec = dataclasses.replace(base, experts=experts or base.experts, hidden=hidden or base.hidden,
                               inter=inter or base.inter)
    E, k = spec.experts, spec.top_k
    if spec.router == "deepseek":
        per = E // spec.groups if E % spec.groups == 0 else 0
        if per < 2 or k > spec.groups_kept * per:
            raise ValueError(f"{base.name} with E={E}: its router needs E divisible by {spec.groups} groups, "
                             f">= 2 experts per group and top-{k} <= the experts of {spec.groups_kept} kept groups")
    elif k > E:
        raise ValueError(f"{base.name} with E={E}: top-{k} needs at least {k} experts")
    return spec


def plan_cases(args: argparse.Namespace, ranks: int) -> list[PresetSpec]:
    """The layer shapes to run on `ranks` ranks, one per (preset, expert count); BenchError when one is impossible
    (E not divisible by the ranks, or a router that cannot route over E experts)."""
    specs = []
    for name in args.presets:
        for e in args.experts or [PRESETS[name].experts]:
            try:
                spec = layer_spec(PRESETS[name], e, args.hidden, args.inter)
            except ValueError as err:
                raise BenchError(str(err)) from None
            if spec.experts % ranks:
                raise BenchError(f"{name}: E={spec.experts} experts do not split into {ranks} ranks of contiguous "
                                 f"blocks; run a number of GPUs that divides {spec.experts} or pass --experts")
            specs.append(spec)
    return specs


def expert_impl_for(args: argparse.Namespace, precision: str) -> str:
    """grouped or loop for one precision (auto: grouped only for bf16 on CUDA)."""
    if args.expert_impl != "auto":
        return args.expert_impl
    return "grouped" if precision == "bf16" and args.device == "cuda" else "loop"


def split_sizes(counts: list[int], ranks: int) -> list[int]:
    """Rows per rank from rows per expert (E counts, contiguous blocks of E/ranks experts per rank): the send split
    sizes from the per-expert send counts, or the receive split sizes from the received counts, which hold E/ranks
    per-local-expert counts from each source rank in rank order."""
    if ranks < 1 or len(counts) % ranks:
        raise ValueError(f"{len(counts)} counts do not split into {ranks} ranks")
    per = len(counts) // ranks
    return [sum(counts[r * per:(r + 1) * per]) for r in range(ranks)]


def local_expert_totals(recv_counts: list[int], ranks: int) -> list[int]:
    """Rows of each local expert summed over the source ranks (recv_counts[s·E_loc + e] came from rank s for local
    expert e): the group sizes of the expert GEMMs."""
    per = len(recv_counts) // ranks
    return [sum(recv_counts[s * per + e] for s in range(ranks)) for e in range(per)]


def expert_major_positions(recv_counts: list[int], ranks: int) -> list[int]:
    """Where each received row goes when the rows are regrouped by local expert.

    all_to_all_single delivers the rows source-major: every source rank's block in rank order, and inside it that
    source's rows of local expert 0, 1, ... (the sender sorted them by expert). The grouped GEMM needs them
    expert-major: all of expert 0's rows (source 0's first), then expert 1's, ... Entry j is the expert-major
    position of received row j. `expert_major_index` computes the same on the device."""
    per = len(recv_counts) // ranks
    totals = local_expert_totals(recv_counts, ranks)
    expert_start = [sum(totals[:e]) for e in range(per)]
    out = []
    for s in range(ranks):
        for e in range(per):
            c = recv_counts[s * per + e]
            before = sum(recv_counts[q * per + e] for q in range(s))  # rows of expert e from earlier sources
            out += range(expert_start[e] + before, expert_start[e] + before + c)
    return out


def method_text(args: argparse.Namespace, precision: str, ranks: int) -> str:
    """How the number was taken, in words, for the JSON record."""
    impl = expert_impl_for(args, precision)
    experts = ("torch._grouped_mm" if impl == "grouped"
               else "a per-expert matmul loop over the host-known counts")
    if precision == "tf32":
        experts += (", fp32 tensors with TF32 matmuls" if args.device == "cuda"
                    else ", fp32 tensors (no TF32 on the CPU)")
    clock = ("CUDA events around one layer call on every rank" if args.device == "cuda"
             else "time.perf_counter around one layer call on every rank")
    where = "one per GPU" if args.device == "cuda" else "on the CPU"
    return (f"torch expert parallelism over {args.backend}, {ranks} process{'es' if ranks > 1 else ''} ({where}), "
            f"E/{ranks} contiguous experts each; replicated router; per-expert counts exchanged with all_to_all_single and one host sync for the split sizes; "
            f"tokens sent and results returned with all_to_all_single (uneven splits); local experts with "
            f"{experts}; unpermute and weighted sum over k. {clock} after dist.barrier(), a call's time = max over "
            f"ranks; median and min of {args.repeats} calls after {args.warmup} warm-up, "
            f"{args.input_sets} input set{'s' if args.input_sets > 1 else ''} per rank")


def config_text(spec: PresetSpec, precision: str, ranks: int) -> str:
    """The layer's shape in words, in the style of `flashmoe bench`'s config field."""
    parts = [f"H={spec.hidden} I={spec.inter} E={spec.experts} k={spec.top_k}",
             "gated FFN, silu" if spec.gated else "plain FFN, relu"]
    if spec.router == "softmax":
        parts.append("softmax top-k renormalised")
    else:
        parts.append(f"sigmoid, {spec.groups} groups ({spec.groups_kept} kept), selection bias, renormalised, "
                     f"scaling {spec.scaling}")
    if spec.shared_inter:
        parts.append(f"shared expert I={spec.shared_inter} (replicated)")
    parts += [f"{spec.experts // ranks} experts per rank", precision]
    return ", ".join(parts)


def make_record(args: argparse.Namespace, spec: PresetSpec, precision: str, tokens_per_gpu: int, ranks: int,
                times_ms: list[float], device: str, date: str, torch_version: str) -> dict:
    """One JSON object of `--json`, from the per-call times (already the max over the ranks). A layer whose H or I
    was overridden is named "custom (from NAME)", as `flashmoe bench` names one, so it is never tabled as the preset;
    an expert count of its own is in `experts`."""
    base = PRESETS[spec.name]
    shaped = (spec.hidden, spec.inter) != (base.hidden, base.inter)
    return {
        "impl": IMPL, "preset": f"custom (from {spec.name})" if shaped else spec.name, "experts": spec.experts, "tokens_per_gpu": tokens_per_gpu,
        "gpus": ranks, "precision": precision, "median_ms": statistics.median(times_ms), "min_ms": min(times_ms),
        "date": date, "device": device, "method": method_text(args, precision, ranks),
        "config": config_text(spec, precision, ranks),
        "expert_impl": expert_impl_for(args, precision), "backend": args.backend, "iterations": args.repeats,
        "warmup": args.warmup, "input_sets": args.input_sets, "torch": torch_version,
    }


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------------------------------
# Torch parts: `torch` and `dist` are bound by start(), so nothing above needs torch.

torch = None  # type: ignore[assignment]
dist = None  # type: ignore[assignment]


def bind_torch():
    """Imports torch and torch.distributed into this module (and torch_moe_baseline); BenchError without torch."""
    global torch, dist
    torch = tmb.bind_torch()
    import torch.distributed as _dist
    dist = _dist
    return torch


def start(args: argparse.Namespace):
    """Imports torch, joins the process group (a group of one without torchrun) and returns the device."""
    bind_torch()
    if "RANK" not in os.environ:  # not under torchrun: a group of one on this machine
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise BenchError("torch.cuda.is_available() is False: use a GPU host, or --backend gloo --device cpu")
        if local >= torch.cuda.device_count():
            raise BenchError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs are visible: "
                             f"--nproc-per-node must not exceed the GPU count")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        tmb.set_tf32(True)  # affects the fp32 (tf32) cases only
        dist.init_process_group(backend=args.backend, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group(backend=args.backend)
    return device


class EPLayer:
    """One rank's share of a layer: the replicated router (and shared expert) and its contiguous block of experts.
    Duck-compatible with torch_moe_baseline.Layer for its router, expert and shared-expert functions."""

    def __init__(self, full: "tmb.Layer", rank: int, ranks: int):
        spec = full.spec
        self.spec, self.dtype, self.device = spec, full.dtype, full.device
        self.ranks, self.local = ranks, spec.experts // ranks
        lo = rank * self.local
        self.wg, self.bias, self.ws_in, self.ws_out = full.wg, full.bias, full.ws_in, full.ws_out
        self.w_in = full.w_in[lo:lo + self.local].clone()
        self.w_out = full.w_out[lo:lo + self.local].clone()
        self.w_in_t = self.w_in.transpose(1, 2)
        self.w_out_t = self.w_out.transpose(1, 2)


def expert_major_index(recv_counts, ranks: int, total: int):
    """expert_major_positions on the device, without a host sync: `recv_counts` is the received [ranks·E_loc] int64
    count tensor and `total` its (host-known) sum."""
    c = recv_counts.view(ranks, -1)
    per = c.shape[1]
    sizes_src = c.reshape(-1)  # block (s, e) at s·E_loc + e, in the order received
    start_src = torch.cumsum(sizes_src, 0) - sizes_src
    sizes_exp = c.t().reshape(-1)  # block (e, s) at e·ranks + s, in the order the GEMMs want
    start_exp = (torch.cumsum(sizes_exp, 0) - sizes_exp).view(per, ranks).t().reshape(-1)
    block = torch.repeat_interleave(torch.arange(ranks * per, device=c.device), sizes_src, output_size=total)
    return torch.arange(total, device=c.device) - start_src[block] + start_exp[block]


def loop_experts(layer: EPLayer, xs, totals: list[int]):
    """The local experts one at a time on their consecutive rows of `xs` (group sizes known on the host)."""
    y = xs.new_empty(xs.shape[0], layer.spec.hidden)
    start = 0
    for e, c in enumerate(totals):
        if c:
            y[start:start + c] = tmb.expert_ffn(layer, e, xs[start:start + c])
            start += c
    return y


def ep_dispatch_combine(layer: EPLayer, x, ids, w, impl: str):
    """Everything after the router: dispatch, local experts, return, unpermute, weighted sum (+ shared expert)."""
    N, E, H = layer.ranks, layer.spec.experts, layer.spec.hidden
    flat, order, tok = tmb.sort_by_expert(ids)
    send_x = x.index_select(0, tok)
    # int64 rows per global expert, in destination-rank blocks (scatter_add_, not bincount: on CUDA bincount reads
    # the max id on the host, a second sync)
    counts = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts)  # E/N counts to each rank
    both = torch.cat([counts, recv_counts]).tolist()  # the one host sync: the split sizes
    send_splits = split_sizes(both[:E], N)
    recv_host = both[E:]
    recv_splits = split_sizes(recv_host, N)
    n_recv = sum(recv_splits)
    recv_x = x.new_empty(n_recv, H)
    dist.all_to_all_single(recv_x, send_x, recv_splits, send_splits)
    # Regroup source-major → expert-major (nothing to move with one rank or one local expert).
    pos = expert_major_index(recv_counts, N, n_recv) if N > 1 and layer.local > 1 else None
    if pos is not None:
        xs = torch.empty_like(recv_x)
        xs.index_copy_(0, pos, recv_x)
    else:
        xs = recv_x
    if n_recv == 0:
        y = xs
    elif impl == "grouped":
        offs = torch.cumsum(recv_counts.view(N, -1).sum(0), 0, dtype=torch.int32)
        y = tmb.grouped_experts(layer, xs, offs)
    else:
        y = loop_experts(layer, xs, local_expert_totals(recv_host, N))
    y = (y.index_select(0, pos) if pos is not None else y).contiguous()
    back = y.new_empty(send_x.shape[0], H)
    dist.all_to_all_single(back, y, send_splits, recv_splits)
    out = tmb.combine_slots(back, order, w)
    if layer.ws_in is not None:
        out = out + tmb.shared_ffn(layer, x)
    return out


def forward_ep(layer: EPLayer, x, impl: str):
    """One expert-parallel layer call on this rank's tokens."""
    ids, w = tmb.route(layer, x)
    return ep_dispatch_combine(layer, x, ids, w, impl)


def random_inputs(spec: PresetSpec, dtype, device, tokens: int, count: int, seed: int):
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return [torch.randn(tokens, spec.hidden, dtype=dtype, device=device, generator=g) for _ in range(count)]


def fingerprint(t):
    """Three float64 sums that differ when two ranks' copies of a replicated tensor differ."""
    d = t.double().reshape(-1)
    ramp = torch.arange(1, d.numel() + 1, dtype=torch.float64, device=d.device) / d.numel()
    return torch.stack([d.sum(), d.abs().sum(), (d * ramp).sum()])


def all_gather(t):
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return parts


def run_check(full: "tmb.Layer", layer: EPLayer, precision: str, impl: str, tokens: int, seed: int) -> list[str]:
    """Every rank runs `tokens` tokens through the EP layer; rank 0 checks the router, that the router weights are
    the same on every rank, and the gathered outputs against a float64 single-process layer fed the gathered
    inputs and the routing the ranks used. Returns the failures on rank 0 ([] elsewhere; see agree())."""
    rank = dist.get_rank()
    x = random_inputs(layer.spec, layer.dtype, layer.device, tokens, 1, seed + 7 + 1000 * rank)[0]
    ids, w = tmb.route(layer, x)
    y = ep_dispatch_combine(layer, x, ids, w, impl)
    replicated = [layer.wg] + [t for t in (layer.bias, layer.ws_in, layer.ws_out) if t is not None]
    prints = all_gather(torch.stack([fingerprint(t) for t in replicated]))
    xs, ys, idss, ws = (torch.cat(all_gather(t)) for t in (x, y, ids, w))
    if rank != 0:
        return []
    bad = []
    differ = [r for r, p in enumerate(prints) if not torch.equal(p, prints[0])]
    if differ:
        bad.append(f"router/shared weights on ranks {differ} differ from rank 0's: not replicated")
    bad += tmb.check_router(full, tmb.gate_logits(full, xs))
    e = tmb.rel_err(ys, tmb.reference_layer(full, xs, idss, ws))
    limit = TOL_VS_FP64[precision]
    log(f"  check torch-ep {precision} ({impl}) on {dist.get_world_size()} ranks x {tokens} tokens vs float64: "
        f"rel. error {e:.2e} (limit {limit:.0e})")
    if not e <= limit:
        bad.append(f"torch-ep {precision} vs float64 rel. error {e:.2e} (limit {limit:.0e})")
    return bad


def agree(ok: bool, device) -> bool:
    """Rank 0's verdict on every rank, so all of them skip or time the same cases."""
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.broadcast(flag, 0)
    return bool(flag.item())


def time_calls(fn, inputs: list, warmup: int, repeats: int, device) -> list[float]:
    """Milliseconds of each timed call, the max over the ranks: a barrier (and an idle device) before each call,
    CUDA events (perf_counter on the CPU) around it on every rank, one all_reduce MAX at the end."""
    cuda = device.type == "cuda"

    def settle():
        dist.barrier()
        if cuda:
            torch.cuda.synchronize()

    times = tmb.time_calls(fn, inputs, warmup, repeats, before_each=settle, cuda=cuda)
    t = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def run(args: argparse.Namespace) -> int:
    device = start(args)
    try:
        return run_cases(args, device)
    finally:
        dist.destroy_process_group()


def run_cases(args: argparse.Namespace, device) -> int:
    rank, ranks = dist.get_rank(), dist.get_world_size()
    specs = plan_cases(args, ranks)  # before any weights: every rank fails the same way, at once
    if rank == 0:
        log(f"torch {torch.__version__}, {args.backend}, {ranks} rank{'s' if ranks > 1 else ''} on "
            f"{device_name(device)}" + (f", CUDA {torch.version.cuda}" if device.type == "cuda" else ""))
        if args.repeats < 20:
            log(f"warning: --iterations {args.repeats} < 20; the method asks for at least 20")
        if args.warmup < 5:
            log(f"warning: --warmup {args.warmup} < 5; the method asks for at least 5")
    if any(expert_impl_for(args, p) == "grouped" for p in args.precisions) and tmb.GROUPED_MM is None:
        raise BenchError(f"torch {torch.__version__} has no torch._grouped_mm: use --expert-impl loop")
    results: list[dict] = []
    failures: list[str] = []
    t0 = time.time()
    with torch.inference_mode():
        for spec in specs:
            for prec in args.precisions:
                impl = expert_impl_for(args, prec)
                full = tmb.Layer(spec, tmb.dtype_of(prec), device, args.seed)  # the same weights on every rank
                layer = EPLayer(full, rank, ranks)
                if not (args.check and rank == 0):
                    full = None  # only rank 0's reference needs every expert
                label = f"{spec.name} E={spec.experts} {prec}"
                if rank == 0:
                    log(f"== {label}: {layer.local} experts per rank, local experts with {impl}")
                if args.check:
                    bad = run_check(full, layer, prec, impl, args.check_tokens, args.seed)
                    for b in bad:
                        log(f"  CHECK FAILED: {b}")
                    failures += [f"{label}: {b}" for b in bad]
                    full = None
                    if not agree(not bad, device):
                        if rank == 0:
                            log(f"  not timing {label}: numbers from a layer that computes the wrong thing would "
                                f"only mislead")
                        continue
                for T in args.tokens_per_gpu:
                    inputs = random_inputs(spec, layer.dtype, device, T, args.input_sets,
                                           args.seed + T + 1000 * rank)
                    times = time_calls(lambda x: forward_ep(layer, x, impl), inputs, args.warmup, args.repeats,
                                       device)
                    del inputs
                    if rank != 0:
                        continue
                    r = make_record(args, spec, prec, T, ranks, times, device_name(device), utc_now(),
                                    torch.__version__)
                    results.append(r)
                    tmb.save_json(args.json, results)  # after every case, so a crash keeps what was measured
                    log(f"  {spec.name:<10} E={spec.experts:<4} T={T:<6} x {ranks} {prec}: median "
                        f"{r['median_ms']:8.3f} ms  min {r['min_ms']:8.3f} ms")
                del layer
                if device.type == "cuda":
                    tmb.free_memory()
    if rank == 0:
        rows = [[r["preset"], str(r["experts"]), str(r["tokens_per_gpu"]), str(r["gpus"]), r["precision"],
                 benchlib.fmt_ms(r["median_ms"]), benchlib.fmt_ms(r["min_ms"])] for r in results]
        log("")
        log(benchlib.text_table(["preset", "E", "T/GPU", "GPUs", "prec", "median ms", "min ms"], rows))
        log(f"median of {args.repeats} after {args.warmup} warm-up, {args.input_sets} input sets per rank; "
            f"total {time.time() - t0:.0f} s")
        if args.json:
            tmb.save_json(args.json, results)
            log(f"wrote {len(results)} results to {args.json}")
        if failures:
            log(f"{len(failures)} FAILURE(S):")
            for b in failures:
                log(f"  {b}")
    return 0 if agree(not failures, device) else 1  # every rank calls agree(): it is a collective


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except BenchError as e:
        who = f" (rank {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"error{who}: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
