"""`NativeGroup`: one rank of an expert-parallel group (flashmoe_group_t), over an all-gather given as a Python
function, with raw-pointer calls. No torch here: `flashmoe.distributed.MoEGroupLayer` checks tensors, supplies the
torch.distributed all-gather and calls this class.

The all-gather is called only from inside the collective calls (create, destroy, and forward without
tokens_per_rank), on the calling thread, through a ctypes callback: it receives this rank's block (bytes, the same
length on every rank) and must return every rank's block concatenated in rank order. An exception it raises is
kept, the library is told the all-gather failed, and the FlashMoEError that follows is raised from that exception.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Sequence

from . import _lib
from ._checks import ArrayInfo, check_weights
from .config import STORAGE_DTYPE, MoEConfig

#: An all-gather of equal-sized blocks: this rank's block in, every rank's blocks (in rank order) out.
AllGather = Callable[[bytes], bytes]


def expert_range(experts: int, world_size: int, rank: int) -> range:
    """The experts rank `rank` of `world_size` owns (flashmoe_expert_range): contiguous blocks, the first
    experts % world_size ranks one expert larger."""
    first, count = ctypes.c_int32(), ctypes.c_int32()
    status = _lib.lib().flashmoe_expert_range(experts, world_size, rank, ctypes.byref(first), ctypes.byref(count))
    _lib.raise_for(status, "flashmoe_expert_range")
    return range(first.value, first.value + count.value)


class NativeGroup:
    """An open rank handle. `shard`: the per-expert weights hold only this rank's experts (`expert_range`), else
    every expert. `weights` are device addresses on `device` (checked against the config here: names, shapes,
    dtypes, device strings, contiguity, alignment)."""

    def __init__(self, config: MoEConfig, weights: dict[str, ArrayInfo], *, precision: str, device: int, rank: int,
                 world_size: int, shard: bool, allgather: AllGather):
        if not callable(allgather):
            raise TypeError(f"allgather must be callable (bytes -> bytes), got {type(allgather).__name__}")
        struct, w, self.experts = self.prepare(config, weights, precision=precision, device=device, rank=rank,
                                               world_size=world_size, shard=shard)
        self.world_size, self.rank = world_size, rank
        self._allgather = allgather
        self._error: BaseException | None = None
        # Kept for the handle's life: the library calls it from destroy and forward too.
        self._callback = _lib.ALLGATHER_FN(self._gather)
        g = _lib.GroupConfig.init()
        g.world_size, g.rank = world_size, rank
        g.weights = _lib.GROUP_WEIGHTS_SHARD if shard else _lib.GROUP_WEIGHTS_ALL
        g.allgather = self._callback
        lib = _lib.lib()
        handle = ctypes.c_void_p()
        status = lib.flashmoe_group_create(ctypes.byref(struct), ctypes.byref(w), ctypes.byref(g),
                                           ctypes.byref(handle))
        self._raise(status, "flashmoe_group_create")
        self.handle: int = handle.value or 0
        self.config = config
        self.device = device
        self.precision = precision
        self.storage_dtype = STORAGE_DTYPE[precision]
        self.output_dtype = "float32" if config.output == "float32" else self.storage_dtype
        self._forward = lib.flashmoe_group_forward
        self._close_lock = threading.Lock()

    @staticmethod
    def prepare(config: MoEConfig, weights: dict[str, ArrayInfo], *, precision: str, device: int, rank: int,
                world_size: int, shard: bool) -> tuple[_lib.Config, _lib.Weights, range]:
        """Every check a rank can make alone (config, rank, world size, weights against its experts), and the C
        structs; raises TypeError/ValueError naming the argument. Returns (config, weights, this rank's experts)."""
        config.validate()
        for name, value in (("rank", rank), ("world_size", world_size), ("device", device)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if not 1 <= world_size <= config.experts:
            raise ValueError(f"world_size must be between 1 and config.experts ({config.experts}), got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be between 0 and world_size - 1 ({world_size - 1}), got {rank}")
        experts = expert_range(config.experts, world_size, rank)
        layout = check_weights(config, weights, precision, f"cuda:{device}",
                               local_experts=len(experts) if shard else None)
        struct = config.to_struct(precision=precision, backend=_lib.BACKEND_CUDA, device=device,
                                  selection_bias="selection_bias" in weights)
        w = _lib.Weights.of(layout, {name: array.ptr for name, array in weights.items()})
        return struct, w, experts

    def _gather(self, _ctx, send, nbytes, recv) -> int:
        """The ctypes callback: never raises into C (the exception is kept for `_raise`)."""
        try:
            block = ctypes.string_at(send, nbytes)
            out = self._allgather(block)
            want = nbytes * self.world_size
            if not isinstance(out, (bytes, bytearray, memoryview)) or len(out) != want:
                raise ValueError(f"allgather returned {type(out).__name__} of {len(out) if hasattr(out, '__len__') else '?'}"
                                 f" bytes; it must return {want} bytes ({self.world_size} blocks of {nbytes})")
            ctypes.memmove(recv, bytes(out), want)
            return 0
        except BaseException as e:  # noqa: BLE001 - an exception must not cross into C
            self._error = e
            return 1

    def _raise(self, status: int, call: str) -> None:
        """raise_for, from the all-gather's exception when it raised one."""
        error, self._error = self._error, None
        if status == _lib.SUCCESS:
            return
        try:
            _lib.raise_for(status, call)
        except _lib.FlashMoEError as e:
            if error is not None:
                raise e from error
            raise

    @property
    def closed(self) -> bool:
        """Whether `close()` has freed this rank (every later call raises ValueError)."""
        return self.handle == 0

    def _live(self) -> int:
        if not self.handle:
            raise ValueError("group: this rank has been closed")
        return self.handle

    def forward_raw(self, x: int, y: int, tokens: int, tokens_per_rank: Sequence[int] | None = None,
                    topk_ids: int = 0, topk_weights: int = 0, stream: int = 0) -> None:
        """flashmoe_group_forward with addresses as ints (0 = NULL). The caller has checked every argument."""
        counts = None
        if tokens_per_rank is not None:
            counts = (ctypes.c_int64 * self.world_size)(*tokens_per_rank)
        status = self._forward(self._live(), x, y, tokens, counts, topk_ids, topk_weights, stream)
        if status:
            self._raise(status, "flashmoe_group_forward")

    def check(self, synchronize: bool = False, stream: int = 0) -> None:
        """Raises FlashMoEKernelError for a kernel error the group recorded (the group is then unusable)."""
        self._raise(_lib.lib().flashmoe_group_check(self._live(), int(bool(synchronize)), stream),
                    "flashmoe_group_check")

    def info(self) -> dict:
        """flashmoe_group_info as a dict."""
        info = _lib.GroupInfo()
        info.size = ctypes.sizeof(info)
        self._raise(_lib.lib().flashmoe_group_info(self._live(), ctypes.byref(info)), "flashmoe_group_info")
        return {name: getattr(info, name) for name, _ in _lib.GroupInfo._fields_ if name not in ("size", "reserved")}

    def close(self) -> None:
        """Collective (every rank calls it): destroys the rank (idempotent)."""
        with self._close_lock:
            handle, self.handle = self.handle, 0
        if handle:
            self._raise(_lib.lib().flashmoe_group_destroy(handle), "flashmoe_group_destroy")

    def __repr__(self) -> str:
        c = self.config
        state = "closed" if self.closed else f"handle {self.handle:#x}"
        return (f"NativeGroup(rank {self.rank} of {self.world_size}, experts [{self.experts.start}, "
                f"{self.experts.stop}), cuda:{self.device}, {self.precision}, H={c.hidden}, E={c.experts}, {state})")
