"""flashmoe.distributed on a GPU host, one process per rank (run by scripts/gpu-dist-python under torchrun).

Every rank builds the same layers and global tokens from fixed seeds, takes its share of the tokens (uneven on
purpose), runs its MoEGroupLayer and compares its rows, bit for bit, with one flashmoe.MoELayer over all the
tokens on its GPU (y, topk_ids, topk_weights), when the two use the same gate split (the K split of the router
GEMM, which changes the logits' rounding; reported and then compared within the precision's tolerance otherwise).

Cases: bf16 gated softmax from each rank's shard; fp32 plain FFN with biases from full weights and E not divisible
by the ranks; float32 output; an empty rank; capacity drops by global token order; bf16 returns (same routing, y
within 1e-2, its error printed); 20 calls back to back, counts given and all-gathered alike; 5 tokens (the decode
gate: gate split 0); fp8 from bf16 experts and from E4M3 codes with block scales (FLASHMOE_EXPERIMENTAL_FP8=1 is
set here); the forward captured in a torch.cuda.CUDAGraph and replayed with new inputs, each replay
bitwise equal to an eager call; a rank that stops calling (every rank gets FlashMoEKernelError "gave up waiting"
within the wait budget + 30 s, then closes); a rank with another config (every rank gets
FLASHMOE_ERROR_INVALID_ARGUMENT).

Ranks may share one GPU (contexts time-slice; torch.distributed must then be gloo, as NCCL refuses two ranks on one
GPU). Prints one line per check and "gpu_dist_check rank R: N passed, M failed"; exits 1 on any failure.

    torchrun --nproc-per-node 2 python/tests/gpu_dist_check.py [--device 0] [--json FILE] [--only fp8]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import flashmoe  # noqa: E402
from flashmoe import _lib  # noqa: E402
from flashmoe import distributed as fd  # noqa: E402
from flashmoe.config import MoEConfig  # noqa: E402

TOLERANCE = {"fp32": 1e-5, "tf32": 2e-3, "bf16": 1e-2, "fp16": 1e-2, "fp8": 5e-2}
WAIT_BUDGET_MS = 20000  # time-sliced contexts wait for each other's slices


class Checks:
    def __init__(self, rank: int):
        self.rank, self.passed, self.failed, self.rows = rank, 0, 0, []

    def record(self, name: str, ok: bool, detail: str = "") -> None:
        self.passed += ok
        self.failed += not ok
        self.rows.append({"name": name, "ok": bool(ok), "detail": detail})
        print(f"rank {self.rank}: {'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)


def make_weights(config: MoEConfig, dtype: torch.dtype, device: torch.device, seed: int,
                 fp8_codes: bool = False) -> dict[str, torch.Tensor]:
    """The same random weights on every rank (CPU generator, then moved); `fp8_codes`: the routed experts as
    float8_e4m3fn codes with their float32 block scales (`gate_up_scale`, `down_scale`)."""
    g = torch.Generator().manual_seed(seed)
    h, i, e = config.hidden, config.intermediate, config.experts

    def rand(*shape, scale=1.0, as_type=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(as_type).to(device).contiguous()

    first = 2 * i if config.ffn == "gated" else i
    w = {"router": rand(e, h, scale=h ** -0.5), "gate_up": rand(e, first, h, scale=h ** -0.5),
         "down": rand(e, h, i, scale=i ** -0.5)}
    if config.bias:
        w["b1"] = rand(e, i, scale=0.1, as_type=torch.float32)
        w["b2"] = rand(e, h, scale=0.1, as_type=torch.float32)
    if fp8_codes:
        from hf_models import codes_and_scales  # the library's block quantization (python/tests)

        for name in ("gate_up", "down"):
            codes, scales = codes_and_scales(w[name])
            w[name], w[f"{name}_scale"] = codes.to(device), scales.to(device)
    return w


def split(total: int, world: int, empty_rank: int | None) -> list[int]:
    """Uneven counts summing to total: rank r gets a share ∝ r + 1 (or none, for `empty_rank`)."""
    shares = [0 if r == empty_rank else r + 1 for r in range(world)]
    counts = [total * s // sum(shares) for s in shares]
    counts[max(range(world), key=lambda r: shares[r])] += total - sum(counts)
    return counts


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """‖y − ref‖ / ‖ref‖ in float32."""
    ref = ref.float()
    return float((y.float() - ref).norm() / max(float(ref.norm()), 1e-30))


def gate_split(grid_blocks: int, tokens: int, config: MoEConfig) -> int:
    """The single-rank operator's automatic gate split (FusedKernel.gateSplit): 0, the decode gate
    (gate_gemv.cuh), for 1 … 8 tokens of a 16-bit layer; else enough K slices to occupy the blocks, up to 16 while
    a token tile's partial logits stay within 16 batches of 2048 loads, 4 beyond (expert tiles of 128 router rows
    assumed: exact for these cases' 16 experts or fewer)."""
    if 1 <= tokens <= 8 and config.precision in ("bf16", "fp16"):
        return 0
    router_rows = config.experts + (1 if config.shared_gated else 0)
    tiles = max(1, math.ceil(tokens / 128))
    gate_tiles = math.ceil(router_rows / 128)
    batches = math.ceil(min(max(tokens, 1), 128) * router_rows / 2048)
    return max(1, min(16, grid_blocks // (tiles * gate_tiles), max(4, 16 // batches)))


def run_case(checks: Checks, name: str, config: MoEConfig, *, dtype, device, total: int, shard: bool, calls: int = 2,
             empty_rank: int | None = None, seed: int = 1, fp8_codes: bool = False) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    weights = make_weights(config, dtype, device, seed, fp8_codes)
    g = torch.Generator().manual_seed(seed + 1000)
    x_all = torch.randn(total, config.hidden, generator=g).to(dtype).to(device)
    counts = split(total, world, empty_rank)
    start = sum(counts[:rank])
    x = x_all[start:start + counts[rank]].contiguous()
    layer = fd.MoEGroupLayer(config, fd.shard_weights(config, weights) if shard else weights)
    try:
        outs = []
        for c in range(calls):  # even calls pass the counts, odd calls all-gather them
            outs.append(layer(x, tokens_per_rank=counts if c % 2 == 0 else None, return_routing=True))
        layer.check(synchronize=True)
        info = layer.info()
        same = all(all(torch.equal(a, b) for a, b in zip(o, outs[0])) for o in outs[1:])
        checks.record(f"{name}: {calls} calls bitwise equal", same)
        single = flashmoe.MoELayer(config.replace(max_tokens=max(total, 1), wait_budget_ms=0, storage_returns=False),
                                 weights)
        y_ref, ids_ref, w_ref = single(x_all, return_routing=True)
        torch.cuda.synchronize(device)
        rows = slice(start, start + counts[rank])
        y, ids, w = outs[0]
        ref_split = gate_split(single.info()["grid_blocks"], total, config)
        detail = (f"tokens {counts[rank]} of {total} (split {counts}), experts [{layer.experts.start}, "
                  f"{layer.experts.stop}), gate split {info['gate_split']} (single {ref_split}), "
                  f"weight_bytes {info['weight_bytes']}, workspace_bytes {info['workspace_bytes']}")
        if config.storage_returns:
            # Expert outputs came back in bf16: the routing is one rank's, y within the tolerance of it; and a
            # single-GPU op with storage rows rounds each expert row alike, so its bits (same gate split).
            err = relative_error(y, y_ref[rows])
            routing = torch.equal(ids, ids_ref[rows]) and torch.equal(w, w_ref[rows])
            tol = TOLERANCE[config.precision]
            checks.record(f"{name}: same routing, y within {tol} of the single-GPU op", routing and err < tol,
                          f"{detail}, relative error {err:.3e} (bf16 returns)")
            if info["gate_split"] == ref_split:
                rows_op = flashmoe.MoELayer(config.replace(max_tokens=max(total, 1), wait_budget_ms=0), weights)
                y_rows = rows_op(x_all)
                torch.cuda.synchronize(device)
                checks.record(f"{name}: bitwise equal to the single-GPU op with storage rows",
                              torch.equal(y, y_rows[rows]), detail)
        elif info["gate_split"] == ref_split:
            ok = torch.equal(y, y_ref[rows]) and torch.equal(ids, ids_ref[rows]) and torch.equal(w, w_ref[rows])
            checks.record(f"{name}: bitwise equal to the single-GPU op", ok, detail)
        else:
            err = relative_error(y, y_ref[rows])
            tol = TOLERANCE[config.precision]
            checks.record(f"{name}: within {tol} of the single-GPU op (gate splits differ)", err < tol,
                          f"{detail}, relative error {err:.3e}")
        single.close()
    finally:
        layer.close()


def graph_replays(checks: Checks, config: MoEConfig, device, replays: int = 8) -> None:
    """The group's forward captured in a CUDA graph on every rank, replayed `replays` times with new inputs copied
    into the static input; after each replay the same input through an eager call must give the same bits (y,
    topk_ids, topk_weights), and each replay must differ from the previous one (the replay really ran on the new
    input). Replays and eager calls alternate on every rank alike, so the ranks stay in step: the kernel reads each
    rank's epoch from the device, so a replay runs the next epoch, not the captured one."""
    rank, world = dist.get_rank(), dist.get_world_size()
    weights = make_weights(config, torch.bfloat16, device, 7)
    counts = split(300, world, None)
    layer = fd.MoEGroupLayer(config, fd.shard_weights(config, weights), tokens_per_rank=counts)
    gen = torch.Generator().manual_seed(100 + rank)

    def fresh() -> torch.Tensor:
        return torch.randn(counts[rank], config.hidden, generator=gen).to(torch.bfloat16).to(device)

    try:
        static_x = fresh()
        side = torch.cuda.Stream(device)  # warm-up on a side stream before capture, as torch asks
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                layer(static_x)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = layer(static_x, return_routing=True)
        mismatches, stale, previous = 0, 0, None
        for _ in range(replays):
            x = fresh()
            static_x.copy_(x)
            graph.replay()
            eager = layer(x, return_routing=True)
            if not all(torch.equal(a, b) for a, b in zip(static_out, eager)):
                mismatches += 1
            if previous is not None and torch.equal(previous, static_out[0]):
                stale += 1
            previous = static_out[0].clone()
        torch.cuda.synchronize(device)
        layer.check(synchronize=True)
        checks.record(f"graph: {replays} replays bitwise equal to eager calls", mismatches == 0 and stale == 0,
                      f"tokens {counts[rank]} of 300, {mismatches} replays differ from eager, {stale} replays "
                      f"repeated the previous output")
    finally:
        layer.close()


def rank_stops_calling(checks: Checks, config: MoEConfig, device) -> None:
    """The last rank skips the second step: every other rank's launch waits for its counts until the wait budget
    ends, then every rank (the last one after a barrier) reads the typed error; the group is unusable, closed."""
    rank, world = dist.get_rank(), dist.get_world_size()
    weights = make_weights(config, torch.bfloat16, device, 1)
    x = torch.randn(64, config.hidden, generator=torch.Generator().manual_seed(rank)).to(torch.bfloat16).to(device)
    counts = [64] * world
    layer = fd.MoEGroupLayer(config, fd.shard_weights(config, weights))
    try:
        layer(x, tokens_per_rank=counts)
        layer.check(synchronize=True)
        if rank != world - 1:
            layer(x, tokens_per_rank=counts)
        started = time.monotonic()
        if rank == world - 1:
            dist.barrier()  # after the others have seen their launch fail
        try:
            layer.check(synchronize=True)
            checks.record("a rank stops calling: typed error", False, "no error was reported")
        except _lib.FlashMoEKernelError as e:
            waited = time.monotonic() - started
            checks.record("a rank stops calling: typed error", "gave up waiting" in e.message
                          and waited < config.wait_budget_ms / 1000 + 30, f"after {waited:.1f} s: {e.message[:160]}")
        if rank != world - 1:
            dist.barrier()
    finally:
        layer.close()


def config_mismatch(checks: Checks, device) -> None:
    rank = dist.get_rank()
    config = MoEConfig(hidden=256, intermediate=128, experts=4, top_k=2 if rank == 0 else 1, precision="bf16",
                       max_tokens=64, wait_budget_ms=WAIT_BUDGET_MS)
    try:
        fd.MoEGroupLayer(config, make_weights(config, torch.bfloat16, device, 3)).close()
        checks.record("another config on rank 1: refused", False, "the group was created")
    except _lib.FlashMoEError as e:
        checks.record("another config on rank 1: refused", e.status == _lib.ERROR_INVALID_ARGUMENT
                      and "rank 1's layer differs" in e.message, e.message[:200])


def extra_checks(checks: Checks, config: MoEConfig, device) -> None:
    """The graph replays, a rank that stops calling and a mismatched config, each a check of its own."""
    for name, run in (("graph replays", lambda: graph_replays(checks, config, device)),
                      ("a rank stops calling", lambda: rank_stops_calling(checks, config, device)),
                      ("another config on rank 1", lambda: config_mismatch(checks, device))):
        try:
            run()
        except Exception as e:  # noqa: BLE001 - a failed check; the others still run
            checks.record(name, False, f"{type(e).__name__}: {e}")
            traceback.print_exc()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", type=int, default=None, help="GPU of every rank (default: LOCAL_RANK mod GPUs)")
    parser.add_argument("--json", type=Path, help="write the checks of rank 0 here")
    parser.add_argument("--only", metavar="TEXT",
                        help="run only the layer cases whose name contains TEXT (e.g. fp8), without the graph, "
                             "stopped-rank and mismatch checks")
    args = parser.parse_args()
    # The fp8 cases: the GPU's fp8 path is experimental (docs/fp8.md); the library reads this when it first builds.
    os.environ.setdefault("FLASHMOE_EXPERIMENTAL_FP8", "1")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    index = args.device if args.device is not None else fd.local_rank() % torch.cuda.device_count()
    torch.cuda.set_device(index)
    device = torch.device("cuda", index)
    checks = Checks(rank)
    base = dict(max_tokens=512, wait_budget_ms=WAIT_BUDGET_MS)
    cases = [
        ("bf16 gated softmax, shards", MoEConfig(hidden=1024, intermediate=512, experts=16, top_k=2, precision="bf16",
                                                 **base), torch.bfloat16, dict(total=300, shard=True)),
        ("fp32 plain relu + biases, full weights, E=5", MoEConfig(
            hidden=512, intermediate=256, experts=5, top_k=2, ffn="plain", activation="relu", bias=True,
            precision="fp32", **base), torch.float32, dict(total=257, shard=False)),
        ("bf16, float32 output, an empty rank", MoEConfig(hidden=512, intermediate=256, experts=8, top_k=2,
                                                          precision="bf16", output="float32", **base),
         torch.bfloat16, dict(total=130, shard=True, empty_rank=0)),
        ("bf16 capacity 1.0", MoEConfig(hidden=512, intermediate=256, experts=8, top_k=2, precision="bf16",
                                        capacity_factor=1.0, **base), torch.bfloat16, dict(total=400, shard=True)),
        ("bf16 returns", MoEConfig(hidden=1024, intermediate=512, experts=16, top_k=2, precision="bf16",
                                   storage_returns=True, **base), torch.bfloat16, dict(total=300, shard=True)),
        ("bf16 20 calls", MoEConfig(hidden=1024, intermediate=512, experts=16, top_k=4, precision="bf16", **base),
         torch.bfloat16, dict(total=256, shard=True, calls=20)),
        ("bf16 decode, 5 tokens (the decode gate)", MoEConfig(hidden=1024, intermediate=512, experts=16, top_k=2,
                                                              precision="bf16", **base),
         torch.bfloat16, dict(total=5, shard=True)),
        # fp8 (docs/fp8.md): the sources send E4M3 codes and scales; BF16 experts quantized at creation, and E4M3
        # codes with their block scales, sharded with them.
        ("fp8 from bf16 experts, shards", MoEConfig(hidden=1024, intermediate=512, experts=16, top_k=2,
                                                    precision="fp8", **base), torch.bfloat16,
         dict(total=300, shard=True)),
        ("fp8 from E4M3 codes, shards, an empty rank", MoEConfig(hidden=1024, intermediate=512, experts=16, top_k=4,
                                                                 precision="fp8", **base), torch.bfloat16,
         dict(total=200, shard=True, empty_rank=0, fp8_codes=True)),
    ]
    if args.only:
        cases = [c for c in cases if args.only in c[0]]
    for name, config, dtype, options in cases:
        try:
            run_case(checks, name, config, dtype=dtype, device=device, **options)
        except Exception as e:  # noqa: BLE001 - a failed case is a failed check; the others still run
            checks.record(name, False, f"{type(e).__name__}: {e}")
            traceback.print_exc()
    if not args.only:  # these need the first case's layer and every rank's calls
        extra_checks(checks, cases[0][1], device)
    print(f"gpu_dist_check rank {rank}: {checks.passed} passed, {checks.failed} failed", flush=True)
    if args.json and rank == 0:
        args.json.write_text(json.dumps(checks.rows, indent=1))
    dist.destroy_process_group()
    return 1 if checks.failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
