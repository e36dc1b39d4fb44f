"""Expert-parallel groups from Python without a GPU: `flashmoe.native_group` (ctypes, an all-gather given as a Python
function) and `flashmoe.distributed` (torch.distributed gloo between two processes).

Without a GPU no group can be created, but everything up to the driver can be checked: the Python argument checks,
the ctypes all-gather callback (exceptions, wrong lengths), and the library's exchange over it — ranks meet, a rank
with another config is named on every rank, and a valid group ends on every rank with FLASHMOE_ERROR_CUDA naming the
ranks without a driver. On a machine with a GPU the exchange cases are skipped (host arrays are no device weights);
the GPU side is scripts/gpu-dist-python.

    PYTHONPATH=python:/path/to/cpu-torch python3 -m unittest python/tests/test_distributed.py -v
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import unittest
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from flashmoe import _lib  # noqa: E402
from flashmoe._checks import ArrayInfo  # noqa: E402
from flashmoe.config import MoEConfig  # noqa: E402
from flashmoe.native_group import NativeGroup, expert_range  # noqa: E402

try:
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp
except ImportError as e:  # pragma: no cover - depends on the machine
    torch = None
    TORCH_MISSING = f"torch is not importable ({e}); install a CPU torch to run these tests"
else:
    TORCH_MISSING = ""

CONFIG = MoEConfig(hidden=16, intermediate=8, experts=4, top_k=2, max_tokens=8, precision="fp32")


def gpu_present() -> bool:
    """Whether this machine has an NVIDIA GPU (then the no-driver cases do not apply)."""
    return Path("/dev/nvidia0").exists() or Path("/dev/nvidiactl").exists()


NO_GPU_ONLY = "these cases expect no usable CUDA driver (host arrays stand in for device weights)"


def fake_weights(config: MoEConfig, local_experts: int | None = None) -> tuple[dict[str, ArrayInfo], list]:
    """Host arrays described as if on cuda:0 (nothing reads them before the driver is needed); the arrays are
    returned too, to keep them alive."""
    e = config.experts if local_experts is None else local_experts
    arrays = {"router": np.zeros((config.experts, config.hidden), np.float32),
              "gate_up": np.zeros((e, 2 * config.intermediate, config.hidden), np.float32),
              "down": np.zeros((e, config.hidden, config.intermediate), np.float32)}
    infos = {name: ArrayInfo(name, a.shape, str(a.dtype), True, a.ctypes.data, "cuda:0") for name, a in arrays.items()}
    return infos, list(arrays.values())


def loopback(block: bytes) -> bytes:
    return block


class ThreadGather:
    """An all-gather between Python threads: each call, every thread posts its block, waits, reads all."""

    def __init__(self, world: int):
        self.world = world
        self.barrier = threading.Barrier(world, timeout=30)
        self.blocks: list[bytes | None] = [None] * world

    def member(self, position: int):
        def gather(block: bytes) -> bytes:
            self.blocks[position] = block
            self.barrier.wait()
            out = b"".join(self.blocks)
            self.barrier.wait()
            return out
        return gather


def create_on_threads(configs: list[MoEConfig]) -> list[BaseException | None]:
    """Creates one rank per config on its own thread; returns what each raised (None: created, then closed)."""
    world = len(configs)
    gather = ThreadGather(world)
    results: list[BaseException | None] = [None] * world

    def run(rank: int) -> None:
        infos, keep = fake_weights(configs[rank])
        try:
            NativeGroup(configs[rank], infos, precision="fp32", device=0, rank=rank, world_size=world, shard=False,
                        allgather=gather.member(rank)).close()
        except BaseException as e:  # noqa: BLE001 - reported to the test
            results[rank] = e
        del keep

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


class ExpertRangeTest(unittest.TestCase):
    def test_blocks(self):
        self.assertEqual([expert_range(10, 4, r) for r in range(4)],
                         [range(0, 3), range(3, 6), range(6, 8), range(8, 10)])

    def test_errors_name_the_argument(self):
        with self.assertRaisesRegex(_lib.FlashMoEError, "world_size"):
            expert_range(4, 5, 0)
        with self.assertRaisesRegex(_lib.FlashMoEError, "rank"):
            expert_range(4, 2, 2)


class NativeGroupArgumentTest(unittest.TestCase):
    """Refused in Python, before any call into the library."""

    def make(self, **changes):
        infos, keep = fake_weights(CONFIG)
        args = dict(precision="fp32", device=0, rank=0, world_size=2, shard=False, allgather=loopback)
        args.update(changes)
        return NativeGroup(CONFIG, infos, **args), keep

    def test_rank_and_world_size(self):
        with self.assertRaisesRegex(ValueError, "rank must be between 0 and world_size - 1"):
            self.make(rank=2)
        with self.assertRaisesRegex(ValueError, "world_size must be between 1 and config.experts"):
            self.make(world_size=5)
        with self.assertRaisesRegex(TypeError, "rank must be an int"):
            self.make(rank=1.0)

    def test_allgather_must_be_callable(self):
        with self.assertRaisesRegex(TypeError, "allgather must be callable"):
            self.make(allgather=b"not a function")

    def test_shard_shapes(self):
        infos, keep = fake_weights(CONFIG)  # every expert's weights, but shard=True: down must hold 2 experts
        with self.assertRaisesRegex(ValueError, r"down must have shape \[2, 16, 8\]"):
            NativeGroup(CONFIG, infos, precision="fp32", device=0, rank=1, world_size=2, shard=True,
                        allgather=loopback)

    def test_weights_must_be_on_the_ranks_device(self):
        infos, keep = fake_weights(CONFIG)
        with self.assertRaisesRegex(ValueError, "must be on cuda:1"):
            NativeGroup(CONFIG, infos, precision="fp32", device=1, rank=0, world_size=1, shard=False,
                        allgather=loopback)


@unittest.skipIf(gpu_present(), NO_GPU_ONLY)
class NativeGroupExchangeTest(unittest.TestCase):
    """The library's exchange over Python all-gathers."""

    def test_one_rank_without_a_driver(self):
        infos, keep = fake_weights(CONFIG)
        with self.assertRaises(_lib.FlashMoEError) as caught:
            NativeGroup(CONFIG, infos, precision="fp32", device=0, rank=0, world_size=1, shard=False,
                        allgather=loopback)
        self.assertEqual(caught.exception.status, _lib.ERROR_CUDA)
        self.assertIn("rank 0 of the group has no usable CUDA driver", caught.exception.message)

    def test_an_allgather_exception_is_the_cause(self):
        def broken(block: bytes) -> bytes:
            raise ConnectionError("the process group is gone")

        infos, keep = fake_weights(CONFIG)
        with self.assertRaises(_lib.FlashMoEError) as caught:
            NativeGroup(CONFIG, infos, precision="fp32", device=0, rank=0, world_size=2, shard=False, allgather=broken)
        self.assertEqual(caught.exception.status, _lib.ERROR_GROUP)
        self.assertIn("all-gather returned 1", caught.exception.message)
        self.assertIsInstance(caught.exception.__cause__, ConnectionError)

    def test_an_allgather_of_the_wrong_length(self):
        infos, keep = fake_weights(CONFIG)
        with self.assertRaises(_lib.FlashMoEError) as caught:
            NativeGroup(CONFIG, infos, precision="fp32", device=0, rank=0, world_size=2, shard=False,
                        allgather=loopback)  # one block where two are due
        self.assertEqual(caught.exception.status, _lib.ERROR_GROUP)
        self.assertIsInstance(caught.exception.__cause__, ValueError)
        self.assertIn("must return 64 bytes", str(caught.exception.__cause__))

    def test_ranks_on_threads_all_name_the_ranks_without_a_driver(self):
        for error in create_on_threads([CONFIG, CONFIG, CONFIG]):
            self.assertIsInstance(error, _lib.FlashMoEError)
            self.assertEqual(error.status, _lib.ERROR_CUDA)
            self.assertIn("ranks 0, 1, 2 of the group have no usable CUDA driver", error.message)

    def test_a_rank_with_another_config_is_named_on_every_rank(self):
        for error in create_on_threads([CONFIG, CONFIG.replace(top_k=1)]):
            self.assertIsInstance(error, _lib.FlashMoEError)
            self.assertEqual(error.status, _lib.ERROR_INVALID_ARGUMENT)
            self.assertIn("rank 1's layer differs", error.message)


# ---------------------------------------------------------------------------------------------------------------------
# torch.distributed (gloo) between two processes


def _gloo_worker(rank: int, store: str, case: str, out: str) -> None:
    """One process of a two-rank gloo group; writes 'status|message' (or the exception) to out.rank."""
    from flashmoe import distributed as fd

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        if case == "layer-checks":
            # Rank 0 passes weights without a router; rank 1 passes checkable weights (described on cuda:0, as
            # nothing is read before the exchange): both stop at the verdict all-gather.
            infos, keep = fake_weights(CONFIG)
            if rank == 1:
                fd.MoEGroupLayer._describe = lambda self, weights: (0, infos, "fp32", False)
            fd.MoEGroupLayer(CONFIG, {} if rank == 0 else {"router": None})
            result = "created"
        else:
            config = CONFIG.replace(top_k=1) if case == "mismatch" and rank == 1 else CONFIG
            infos, keep = fake_weights(config)
            NativeGroup(config, infos, precision="fp32", device=0, rank=rank, world_size=2, shard=False,
                        allgather=fd.torch_allgather()).close()
            result = "created"
    except _lib.FlashMoEError as e:
        result = f"{e.status}|{e.message}"
    except Exception as e:  # noqa: BLE001 - reported to the test
        result = f"{type(e).__name__}|{e}"
    finally:
        dist.destroy_process_group()
    Path(f"{out}.{rank}").write_text(result)


@unittest.skipIf(torch is None, TORCH_MISSING)
class TorchDistributedTest(unittest.TestCase):
    def run_case(self, case: str) -> list[tuple[str, str]]:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "result")
            mp.spawn(_gloo_worker, args=(os.path.join(tmp, "store"), case, out), nprocs=2, join=True)
            return [tuple(Path(f"{out}.{r}").read_text().split("|", 1)) for r in range(2)]

    def test_layer_needs_an_initialised_process_group(self):
        from flashmoe import distributed as fd

        if dist.is_initialized():
            self.skipTest("a process group is already initialised in this process")
        with self.assertRaisesRegex(RuntimeError, "init_process_group"):
            fd.MoEGroupLayer(CONFIG, {})

    def test_a_rank_failing_its_checks_stops_every_rank(self):
        (kind0, why0), (kind1, why1) = self.run_case("layer-checks")
        self.assertEqual(kind0, "ValueError")
        self.assertIn("'router'", why0)
        self.assertEqual(kind1, "RuntimeError")
        self.assertIn("rank 0 of the group failed its argument checks", why1)

    @unittest.skipIf(gpu_present(), NO_GPU_ONLY)
    def test_ranks_meet_through_gloo(self):
        for status, message in self.run_case("valid"):
            self.assertEqual(int(status), _lib.ERROR_CUDA, message)
            self.assertIn("ranks 0, 1 of the group have no usable CUDA driver", message)

    @unittest.skipIf(gpu_present(), NO_GPU_ONLY)
    def test_a_config_mismatch_is_found_through_gloo(self):
        for status, message in self.run_case("mismatch"):
            self.assertEqual(int(status), _lib.ERROR_INVALID_ARGUMENT, message)
            self.assertIn("rank 1's layer differs", message)


@unittest.skipIf(torch is None, TORCH_MISSING)
class ShardWeightsTest(unittest.TestCase):
    def test_per_expert_tensors_are_cut_to_the_ranks_experts(self):
        from flashmoe import distributed as fd

        config = CONFIG.replace(experts=5, ffn="plain", bias=True)
        w = {"router": torch.randn(5, 16), "gate_up": torch.randn(5, 8, 16), "down": torch.randn(5, 16, 8),
             "b1": torch.randn(5, 8), "b2": torch.randn(5, 16)}
        mine = fd.shard_weights(config, w, rank=1, world_size=2)  # experts 3 and 4 ([0, 3) and [3, 5))
        self.assertIs(mine["router"], w["router"])
        for name in ("gate_up", "down", "b1", "b2"):
            self.assertTrue(torch.equal(mine[name], w[name][3:5]), name)
            self.assertTrue(mine[name].is_contiguous(), name)
        with self.assertRaisesRegex(ValueError, r"weights\['down'\] must have 5 experts"):
            fd.shard_weights(config, dict(w, down=w["down"][:2]), rank=0, world_size=2)

    def test_fp8_block_scales_are_cut_with_their_codes(self):
        from flashmoe import distributed as fd

        config = CONFIG.replace(experts=5, precision="fp8")
        w = {"router": torch.randn(5, 16), "gate_up": torch.randn(5, 16, 16).to(torch.float8_e4m3fn),
             "down": torch.randn(5, 16, 8).to(torch.float8_e4m3fn), "gate_up_scale": torch.rand(5, 1, 1),
             "down_scale": torch.rand(5, 1, 1)}
        mine = fd.shard_weights(config, w, rank=0, world_size=2)  # experts 0 … 2
        for name in ("gate_up", "down", "gate_up_scale", "down_scale"):
            self.assertEqual(mine[name].shape[0], 3, name)
        self.assertTrue(torch.equal(mine["down_scale"], w["down_scale"][:3]))


class GpuDistPythonScriptTest(unittest.TestCase):
    def test_refuses_without_library(self):
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run([str(HERE.parent.parent / "scripts" / "gpu-dist-python"), tmp], capture_output=True,
                                  text=True, env=dict(os.environ, FLASHMOE_LIB=str(Path(tmp) / "missing.so")))
        self.assertEqual(proc.returncode, 2)
        self.assertIn("scripts/build-lib", proc.stderr)


if __name__ == "__main__":
    unittest.main()
