"""`flashmoe.distributed`: the expert-parallel layer, one process per GPU, inside torchrun.

    import torch, torch.distributed as dist, flashmoe.distributed as fd
    dist.init_process_group("nccl")                        # or "gloo"; torchrun sets RANK, WORLD_SIZE, ...
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    layer = fd.MoEGroupLayer(config, fd.shard_weights(config, full_weights))  # or this rank's shard directly
    y = layer(x)                                           # x: this rank's tokens [S_r, H]; every rank calls it

Each process holds one rank: its GPU, its experts (`expert_range`), its buffers. The ranks meet through
torch.distributed (an all-gather of a few bytes, `torch_allgather`) when the layer is created, and map each other's
buffers with CUDA IPC (all ranks on one node). Every forward is then one kernel launch per rank on the current
stream: each rank routes its own tokens, writes the rows for other ranks' experts straight into their buffers, and
combines its own tokens' results. With the same global tokens the outputs are bitwise those of one
`flashmoe.MoELayer` over all tokens (given the same gate split; see docs/multinode.md).

Collective: creating the layer, `close()`, and every forward (every rank calls it once per step, its own token
count possibly 0). A forward without `tokens_per_rank` all-gathers the token counts through torch.distributed (a
host round trip per call); pass them (or fix them at creation) to avoid it. Capturable in a CUDA graph on every
rank alike (each rank replays its graph once per step; the kernel reads the group's epoch on the device), not
traced by torch.compile.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist

from . import _lib
from .config import MoEConfig
from .native_group import AllGather, NativeGroup, expert_range
from .torch_op import _TORCH_DTYPES, _raw_stream, tensor_info
from ._checks import SCALE_NAMES, check_forward

__all__ = ["MoEGroupLayer", "expert_range", "shard_weights", "torch_allgather"]

#: The per-expert weights (first dimension E), FP8 block scales included; the router, selection bias and shared
#: expert are not split.
PER_EXPERT = ("gate_up", "gate", "up", "down", "b1", "b2") + SCALE_NAMES


def torch_allgather(group=None, device: torch.device | None = None) -> AllGather:
    """An all-gather of equal-sized byte blocks over torch.distributed's `group` (None: the default group):
    uint8 tensors on the CPU for gloo, on `device` (default: the current CUDA device) for NCCL."""
    backend = str(dist.get_backend(group))
    world = dist.get_world_size(group)
    if "gloo" in backend or "mpi" in backend:
        where = torch.device("cpu")
    else:
        where = device or torch.device("cuda", torch.cuda.current_device())

    def gather(block: bytes) -> bytes:
        mine = torch.frombuffer(bytearray(block), dtype=torch.uint8).to(where)
        parts = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(parts, mine, group=group)
        return b"".join(bytes(p.cpu().numpy().tobytes()) for p in parts)

    return gather


def shard_weights(config: MoEConfig, weights: Mapping[str, torch.Tensor], rank: int | None = None,
                  world_size: int | None = None, group=None) -> dict[str, torch.Tensor]:
    """This rank's shard of full weights: the per-expert tensors (gate_up or gate + up, down, b1, b2, and an fp8
    layer's block scales) cut to
    `expert_range(E, world_size, rank)` along their first dimension (contiguous views), the others unchanged.
    `rank` and `world_size` default to torch.distributed's for `group`."""
    rank = dist.get_rank(group) if rank is None else rank
    world_size = dist.get_world_size(group) if world_size is None else world_size
    mine = expert_range(config.experts, world_size, rank)
    out = {}
    for name, t in weights.items():
        if name in PER_EXPERT:
            if not isinstance(t, torch.Tensor) or t.dim() < 1 or t.shape[0] != config.experts:
                raise ValueError(f"weights[{name!r}] must have {config.experts} experts in its first dimension to be "
                                 f"sharded, got {list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
            t = t[mine.start:mine.stop]
        out[name] = t
    return out


class MoEGroupLayer(torch.nn.Module):
    """This process's rank of an expert-parallel MoE layer (an nn.Module; inference only).

    Args:
        config: the layer's shape and options; `max_tokens` is the most tokens ONE rank passes to one forward.
        weights: header-named CUDA tensors on this rank's device (as for `flashmoe.MoELayer`): the router (and
            selection bias, shared expert) whole, and the per-expert tensors either of every expert or of this
            rank's `expert_range` only (`shard_weights`). The library copies what this rank needs at creation, so the
            tensors may be freed afterwards (nothing is registered on the module).
        group: the torch.distributed process group the ranks span (None: the default group; must be initialised).
            Its rank and world size are the layer's.
        tokens_per_rank: every rank's token count, when fixed for every forward (e.g. equal batches): forwards then
            need no count all-gather. A forward may also pass its own.
        allgather: the all-gather to meet through (default: `torch_allgather(group)`), e.g. for tests.
    """

    def __init__(self, config: MoEConfig, weights: Mapping[str, torch.Tensor], *, group=None,
                 tokens_per_rank: Sequence[int] | None = None, allgather: AllGather | None = None):
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a flashmoe.MoEConfig, got {type(config).__name__}")
        config.validate()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("MoEGroupLayer needs torch.distributed: call torch.distributed.init_process_group "
                               "first (torchrun sets the environment it reads)")
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        self.config = config
        self.rank, self.world_size = rank, world
        # Every rank's own checks first, then one all-gather of the verdicts: a rank with bad arguments makes every
        # rank raise here, instead of leaving the others waiting in the library's all-gather.
        problem: Exception | None = None
        try:
            index, infos, precision, shard = self._describe(weights)
            NativeGroup.prepare(config, infos, precision=precision, device=index, rank=rank, world_size=world,
                                shard=shard)
            self._fixed_counts = self._check_counts(tokens_per_rank, "tokens_per_rank") if tokens_per_rank else None
        except (TypeError, ValueError) as e:
            problem = e
        verdicts: list = [None] * world
        dist.all_gather_object(verdicts, None if problem is None else f"{type(problem).__name__}: {problem}",
                               group=group)
        if problem is not None:
            raise problem
        for q, verdict in enumerate(verdicts):
            if verdict is not None:
                raise RuntimeError(f"rank {q} of the group failed its argument checks ({verdict}); every rank stops")
        self.native = NativeGroup(config, infos, precision=precision, device=index, rank=rank, world_size=world,
                                  shard=shard, allgather=allgather or torch_allgather(group, torch.device("cuda", index)))
        self.device = torch.device("cuda", index)
        self.storage_dtype = _TORCH_DTYPES[self.native.storage_dtype]
        self.output_dtype = _TORCH_DTYPES[self.native.output_dtype]

    def _describe(self, weights) -> tuple[int, dict, str, bool]:
        """(device index, weight infos, precision, whether the per-expert weights are this rank's shard)."""
        if not isinstance(weights, Mapping) or "router" not in weights:
            raise ValueError("weights must be a mapping of header names to tensors, with 'router' [E, H]")
        infos = {name: tensor_info(t, f"weights[{name!r}]") for name, t in weights.items()}
        devices = {str(t.device) for t in weights.values()}
        if len(devices) != 1 or not next(iter(devices)).startswith("cuda"):
            raise ValueError(f"weights must all be on one CUDA device (this rank's GPU), got {sorted(devices)}")
        device = next(iter(weights.values())).device
        index = device.index if device.index is not None else torch.cuda.current_device()
        c = self.config
        mine = expert_range(c.experts, self.world_size, self.rank)
        down = weights.get("down")
        shard = isinstance(down, torch.Tensor) and down.dim() == 3 and down.shape[0] == len(mine) \
            and len(mine) != c.experts
        return index, infos, c.resolved_precision(infos["router"].dtype), shard

    @property
    def experts(self) -> range:
        """The experts this rank owns."""
        return self.native.experts

    def _check_counts(self, counts, name: str) -> list[int]:
        counts = [int(c) for c in counts]
        if len(counts) != self.world_size:
            raise ValueError(f"{name} must have one count per rank ({self.world_size}), got {len(counts)}")
        bad = [c for c in counts if not 0 <= c <= self.config.max_tokens]
        if bad:
            raise ValueError(f"{name} entries must be between 0 and config.max_tokens ({self.config.max_tokens}), "
                             f"got {bad[0]}")
        return counts

    def forward(self, x: torch.Tensor, *, tokens_per_rank: Sequence[int] | None = None,
                return_routing: bool = False):
        """y [S_r, H] for this rank's tokens x [S_r, H] (contiguous, the storage dtype, this rank's device, S_r may
        be 0), enqueued on the current stream. Every rank calls it once per step. With `return_routing`, also
        topk_ids [S_r, k] int32 and topk_weights [S_r, k] float32 (expert ids are global)."""
        native = self.native
        if native.closed:
            raise ValueError("layer: this MoEGroupLayer has been closed")
        c = self.config
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        tokens = check_forward(tensor_info(x, "x"), [], hidden=c.hidden, max_tokens=c.max_tokens,
                               storage=native.storage_dtype, device=str(self.device))
        counts = self._check_counts(tokens_per_rank, "tokens_per_rank") if tokens_per_rank is not None \
            else self._fixed_counts
        if counts is not None and counts[self.rank] != tokens:
            raise ValueError(f"tokens_per_rank[{self.rank}] is {counts[self.rank]} but x has {tokens} tokens")
        y = torch.empty((tokens, c.hidden), dtype=self.output_dtype, device=self.device)
        ids = torch.empty((tokens, c.top_k), dtype=torch.int32, device=self.device)
        weights = torch.empty((tokens, c.top_k), dtype=torch.float32, device=self.device)
        native.forward_raw(x.data_ptr(), y.data_ptr(), tokens, counts, ids.data_ptr(), weights.data_ptr(),
                           _raw_stream(self.device.index))
        return (y, ids, weights) if return_routing else y

    def check(self, synchronize: bool = False) -> None:
        """Raises FlashMoEKernelError if a forward of the group recorded a fault (a rank died or stopped calling: a
        device wait expired); the group is then unusable (close it on every rank and create it again). With
        `synchronize`, first waits for the current stream."""
        self.native.check(synchronize, _raw_stream(self.device.index))

    def info(self) -> dict:
        """What this rank holds: max_tokens, weight_bytes, workspace_bytes, world_size, rank, first_expert,
        local_experts, device, grid_blocks, gate_split (of the last forward)."""
        return self.native.info()

    def close(self) -> None:
        """Collective: every rank calls it. Waits for this rank's GPU and for every rank, then frees the rank.
        (Without it the rank is freed when the process exits; a garbage-collected layer is not destroyed, since
        destroying is collective.)"""
        self.native.close()

    def extra_repr(self) -> str:
        """This rank, its experts and the shapes, shown by `print(module)`."""
        c = self.config
        e = self.experts
        return (f"rank {self.rank} of {self.world_size}, experts [{e.start}, {e.stop}) of {c.experts}, H={c.hidden}, "
                f"I={c.intermediate}, k={c.top_k}, max_tokens={c.max_tokens} per rank, {self.device}")


def local_rank() -> int:
    """torchrun's LOCAL_RANK (0 when unset): the GPU a rank should use on its node."""
    return int(os.environ.get("LOCAL_RANK", "0"))
