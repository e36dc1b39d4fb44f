"""FlashMoE from Python: one fused MoE layer (gate, top-k routing, experts, combine) through libflashmoe.so.

Pure Python over ctypes (include/flashmoe.h); the library is found through $FLASHMOE_LIB, next to this package, or
in the repository's lib/ (built by scripts/build-lib).

- numpy, CPU backend: `flashmoe.Layer(config, weights).forward(x)` (no torch needed).
- torch: `flashmoe.MoELayer` (an nn.Module; CUDA or CPU), the custom op `torch.ops.flashmoe.moe_forward`, and
  `flashmoe.patch(model)` to swap the MoE blocks of a transformers model (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3).
- torchrun, one process per GPU: `flashmoe.distributed.MoEGroupLayer` (expert parallelism; import it explicitly).

See docs/pytorch.md.
"""

from ._lib import FlashMoEError, FlashMoEKernelError, LibraryNotFoundError, library_path, version
from .config import MoEConfig

__all__ = ["FlashMoEError", "FlashMoEKernelError", "LibraryNotFoundError", "MoEConfig", "Layer", "MoELayer",
           "patch", "unpatch", "library_path", "version"]

# numpy and torch are imported on first use, so `import flashmoe` needs neither.
_LAZY = {"Layer": ("numpy_api", "Layer"), "MoELayer": ("torch_layer", "MoELayer"), "patch": ("hf", "patch"),
         "unpatch": ("hf", "unpatch"), "FlashMoEBlock": ("hf", "FlashMoEBlock")}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'flashmoe' has no attribute {name!r}")
