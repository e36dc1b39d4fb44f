"""The native library: finding and loading libflashmoe.so, the ctypes mirror of include/flashmoe.h, errors.

Everything here follows include/flashmoe.h field for field; `python/tests/test_ctypes_numpy.py` compiles a C program
against the header and compares every struct size, field offset and constant with this file.

The library is loaded on first use (not at import), so `import flashmoe` works on a machine without it.
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

# ---------------------------------------------------------------------------------------------------------------------
# Constants (include/flashmoe.h)

#: The header version this module mirrors: MAJOR * 10000 + MINOR * 100 + PATCH.
VERSION_MAJOR, VERSION_MINOR, VERSION_PATCH = 0, 5, 0
VERSION = VERSION_MAJOR * 10000 + VERSION_MINOR * 100 + VERSION_PATCH

SUCCESS = 0
ERROR_INVALID_ARGUMENT = 1
ERROR_UNSUPPORTED = 2
ERROR_CUDA = 3
ERROR_OUT_OF_MEMORY = 4
ERROR_KERNEL = 5
ERROR_INTERNAL = 6
ERROR_GROUP = 7
NUM_STATUS = 8
#: Status code -> its C name, for messages.
STATUS_NAMES = {
    SUCCESS: "FLASHMOE_SUCCESS",
    ERROR_INVALID_ARGUMENT: "FLASHMOE_ERROR_INVALID_ARGUMENT",
    ERROR_UNSUPPORTED: "FLASHMOE_ERROR_UNSUPPORTED",
    ERROR_CUDA: "FLASHMOE_ERROR_CUDA",
    ERROR_OUT_OF_MEMORY: "FLASHMOE_ERROR_OUT_OF_MEMORY",
    ERROR_KERNEL: "FLASHMOE_ERROR_KERNEL",
    ERROR_INTERNAL: "FLASHMOE_ERROR_INTERNAL",
    ERROR_GROUP: "FLASHMOE_ERROR_GROUP",
}

BACKEND_CUDA, BACKEND_CPU = 0, 1
PRECISION_FP32, PRECISION_TF32, PRECISION_BF16, PRECISION_FP16, PRECISION_FP8 = 0, 1, 2, 3, 4
FFN_PLAIN, FFN_GATED = 0, 1
ACT_RELU, ACT_GELU, ACT_GELU_TANH, ACT_SILU = 0, 1, 2, 3
ROUTER_SOFTMAX, ROUTER_SIGMOID = 0, 1
LAYOUT_FUSED, LAYOUT_SEPARATE = 0, 1
OUTPUT_STORAGE, OUTPUT_FLOAT32 = 0, 1
FLAG_SYNC_ERRORS = 1
FLAG_INJECT_FAULT = 2
FLAG_STORAGE_RETURNS = 4
CONFIG_MAGIC = 0x464D4F45
GROUP_WEIGHTS_ALL, GROUP_WEIGHTS_SHARD = 0, 1

# ---------------------------------------------------------------------------------------------------------------------
# Structs (same field order and C types as the header; ctypes applies the C alignment rules)

_c_size_t = ctypes.c_size_t
_ptr = ctypes.c_void_p


class Config(ctypes.Structure):
    """flashmoe_config_t. Build it with `Config.init()`, the equivalent of FLASHMOE_CONFIG_INIT."""

    _fields_ = [
        ("size", _c_size_t),
        ("magic", ctypes.c_uint32),
        ("version", ctypes.c_uint32),
        ("hidden", ctypes.c_int32),
        ("intermediate", ctypes.c_int32),
        ("experts", ctypes.c_int32),
        ("top_k", ctypes.c_int32),
        ("ffn", ctypes.c_int32),
        ("activation", ctypes.c_int32),
        ("bias", ctypes.c_int32),
        ("router", ctypes.c_int32),
        ("renormalize", ctypes.c_int32),
        ("groups", ctypes.c_int32),
        ("groups_kept", ctypes.c_int32),
        ("selection_bias", ctypes.c_int32),
        ("scaling", ctypes.c_float),
        ("shared_intermediate", ctypes.c_int32),
        ("shared_gated", ctypes.c_int32),
        ("capacity_factor", ctypes.c_float),
        ("precision", ctypes.c_int32),
        ("backend", ctypes.c_int32),
        ("device", ctypes.c_int32),
        ("output", ctypes.c_int32),
        ("max_tokens", ctypes.c_int64),
        ("flags", ctypes.c_uint32),
        ("wait_budget_ms", ctypes.c_uint32),
    ]

    @classmethod
    def init(cls) -> "Config":
        """FLASHMOE_CONFIG_INIT: the header's defaults."""
        return cls(ctypes.sizeof(cls), CONFIG_MAGIC, VERSION, 0, 0, 0, 0, FFN_GATED, ACT_SILU, 0, ROUTER_SOFTMAX, 1,
                   1, 1, 0, 1.0, 0, 0, 0.0, PRECISION_BF16, BACKEND_CUDA, 0, OUTPUT_STORAGE, 0, 0, 0)


class Weights(ctypes.Structure):
    """flashmoe_weights_t: weight pointers (ints), 0 where absent. Build it with `Weights.init()`."""

    #: The pointer fields, in header order (the four *_scale fields since 0.5: FP8 block scales).
    POINTERS = ("router", "selection_bias", "gate_up", "gate", "up", "down", "b1", "b2", "shared_gate_up",
                "shared_up", "shared_down", "shared_gate", "gate_up_scale", "gate_scale", "up_scale", "down_scale")
    _fields_ = [("size", _c_size_t), ("version", ctypes.c_uint32), ("layout", ctypes.c_int32)] + [
        (name, _ptr) for name in POINTERS
    ]

    @classmethod
    def init(cls) -> "Weights":
        """FLASHMOE_WEIGHTS_INIT."""
        return cls(ctypes.sizeof(cls), VERSION, LAYOUT_FUSED)

    @classmethod
    def of(cls, layout: int, pointers: dict[str, int]) -> "Weights":
        """`init()` with `layout` and the given pointer fields set (the rest 0)."""
        w = cls.init()
        w.layout = layout
        for name, ptr in pointers.items():
            setattr(w, name, ptr)
        return w


class LayerInfo(ctypes.Structure):
    """flashmoe_layer_info_t."""

    _fields_ = [
        ("size", _c_size_t),
        ("max_tokens", ctypes.c_int64),
        ("weight_bytes", ctypes.c_int64),
        ("workspace_bytes", ctypes.c_int64),
        ("backend", ctypes.c_int32),
        ("device", ctypes.c_int32),
        ("grid_blocks", ctypes.c_int32),
        ("reserved", ctypes.c_int32),
    ]


#: flashmoe_allgather_fn: int (*)(void *ctx, const void *send, size_t bytes, void *recv).
ALLGATHER_FN = ctypes.CFUNCTYPE(ctypes.c_int, _ptr, _ptr, _c_size_t, _ptr)


class GroupConfig(ctypes.Structure):
    """flashmoe_group_config_t. Build it with `GroupConfig.init()` (FLASHMOE_GROUP_CONFIG_INIT)."""

    _fields_ = [
        ("size", _c_size_t),
        ("version", ctypes.c_uint32),
        ("world_size", ctypes.c_int32),
        ("rank", ctypes.c_int32),
        ("weights", ctypes.c_int32),
        ("allgather", ALLGATHER_FN),
        ("ctx", _ptr),
    ]

    @classmethod
    def init(cls) -> "GroupConfig":
        """FLASHMOE_GROUP_CONFIG_INIT."""
        return cls(ctypes.sizeof(cls), VERSION, 0, 0, GROUP_WEIGHTS_ALL, ALLGATHER_FN(), None)


class GroupInfo(ctypes.Structure):
    """flashmoe_group_info_t."""

    _fields_ = [
        ("size", _c_size_t),
        ("max_tokens", ctypes.c_int64),
        ("weight_bytes", ctypes.c_int64),
        ("workspace_bytes", ctypes.c_int64),
        ("world_size", ctypes.c_int32),
        ("rank", ctypes.c_int32),
        ("first_expert", ctypes.c_int32),
        ("local_experts", ctypes.c_int32),
        ("device", ctypes.c_int32),
        ("grid_blocks", ctypes.c_int32),
        ("gate_split", ctypes.c_int32),
        ("reserved", ctypes.c_int32),
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Errors


class FlashMoEError(RuntimeError):
    """A failed call into libflashmoe: `status` (the flashmoe_status_t code), `status_name` and `message` (the
    library's last-error text for the calling thread)."""

    def __init__(self, status: int, message: str, call: str = ""):
        self.status = int(status)
        self.status_name = STATUS_NAMES.get(self.status, f"status {self.status}")
        self.message = message
        self.call = call
        where = f"{call}: " if call else ""
        super().__init__(f"{where}{self.status_name}: {message or '(no message)'}")


class FlashMoEKernelError(FlashMoEError):
    """The kernel reported a fault (FLASHMOE_ERROR_KERNEL, e.g. a timed-out device wait). The library has reset the
    layer; the next call runs normally."""


class LibraryNotFoundError(FlashMoEError, OSError):
    """libflashmoe.so could not be found or loaded; the message lists every place tried."""

    def __init__(self, message: str):
        FlashMoEError.__init__(self, ERROR_UNSUPPORTED, message, "load")


# ---------------------------------------------------------------------------------------------------------------------
# Finding and loading the library

LIBRARY_NAME = "libflashmoe.so"
ENV_VAR = "FLASHMOE_LIB"


def candidate_paths() -> list[Path]:
    """Where the library is looked for, in order: $FLASHMOE_LIB (a file, or a folder holding libflashmoe.so), next
    to this package, then the repository's lib/ (python/flashmoe/../../lib)."""
    here = Path(__file__).resolve().parent
    out = []
    env = os.environ.get(ENV_VAR)
    if env:
        p = Path(env).expanduser()
        out.append(p / LIBRARY_NAME if p.is_dir() else p)
    out.append(here / LIBRARY_NAME)
    out.append(here.parent.parent / "lib" / LIBRARY_NAME)
    return out


def _declare(lib: ctypes.CDLL) -> None:
    """Argument and result types of every exported function (the header's prototypes)."""
    status = ctypes.c_int
    protos = {
        "flashmoe_version": (ctypes.c_int, []),
        "flashmoe_status_string": (ctypes.c_char_p, [ctypes.c_int]),
        "flashmoe_last_error": (ctypes.c_char_p, []),
        "flashmoe_layer_create": (status, [ctypes.POINTER(Config), ctypes.POINTER(Weights), ctypes.POINTER(_ptr)]),
        "flashmoe_layer_forward": (status, [_ptr, _ptr, _ptr, ctypes.c_int64, _ptr, _ptr, _ptr]),
        "flashmoe_layer_check": (status, [_ptr, ctypes.c_int, _ptr]),
        "flashmoe_layer_info": (status, [_ptr, ctypes.POINTER(LayerInfo)]),
        "flashmoe_layer_destroy": (status, [_ptr]),
        "flashmoe_expert_range": (status, [ctypes.c_int32, ctypes.c_int32, ctypes.c_int32,
                                           ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_int32)]),
        "flashmoe_group_create": (status, [ctypes.POINTER(Config), ctypes.POINTER(Weights),
                                           ctypes.POINTER(GroupConfig), ctypes.POINTER(_ptr)]),
        "flashmoe_group_forward": (status, [_ptr, _ptr, _ptr, ctypes.c_int64, _ptr, _ptr, _ptr, _ptr]),
        "flashmoe_group_check": (status, [_ptr, ctypes.c_int, _ptr]),
        "flashmoe_group_info": (status, [_ptr, ctypes.POINTER(GroupInfo)]),
        "flashmoe_group_destroy": (status, [_ptr]),
    }
    for name, (restype, argtypes) in protos.items():
        try:
            fn = getattr(lib, name)
        except AttributeError as e:
            raise LibraryNotFoundError(f"{lib._name} does not export {name}: rebuild it with scripts/build-lib") from e
        fn.restype = restype
        fn.argtypes = argtypes


_lock = threading.Lock()
_lib: ctypes.CDLL | None = None


def lib() -> ctypes.CDLL:
    """The loaded library (loaded and version-checked once). Raises LibraryNotFoundError with every path tried."""
    global _lib
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is not None:
            return _lib
        tried = []
        for path in candidate_paths():
            if not path.is_file():
                tried.append(f"{path} (not found)")
                continue
            try:
                loaded = ctypes.CDLL(str(path))
            except OSError as e:
                tried.append(f"{path} ({e})")
                continue
            _declare(loaded)
            found = loaded.flashmoe_version()
            major, minor = found // 10000, found // 100 % 100
            if major != VERSION_MAJOR or minor < VERSION_MINOR:
                raise LibraryNotFoundError(
                    f"{path} is version {major}.{minor}.{found % 100}, but this package needs "
                    f"{VERSION_MAJOR}.{VERSION_MINOR}.x or a later minor: rebuild the library (scripts/build-lib) "
                    f"or point {ENV_VAR} at a matching one")
            _lib = loaded
            return loaded
        raise LibraryNotFoundError(
            f"{LIBRARY_NAME} not found; build it with scripts/build-lib (writes lib/{LIBRARY_NAME}) or set "
            f"{ENV_VAR} to its path. Tried: " + "; ".join(tried))


def library_path() -> str:
    """The file the library was loaded from."""
    return lib()._name


def version() -> tuple[int, int, int]:
    """The loaded library's (major, minor, patch)."""
    v = lib().flashmoe_version()
    return v // 10000, v // 100 % 100, v % 100


def last_error() -> str:
    """The calling thread's last-error message ("" when none)."""
    raw = lib().flashmoe_last_error()
    return raw.decode("utf-8", "replace") if raw else ""


def status_string(status: int) -> str:
    """The library's fixed text for a status code."""
    raw = lib().flashmoe_status_string(status)
    return raw.decode("utf-8", "replace") if raw else ""


def raise_for(status: int, call: str) -> None:
    """Raises the FlashMoEError for a non-zero status, with this thread's last-error text. Call it straight after the
    failed call, on the same thread."""
    if status == SUCCESS:
        return
    message = last_error()
    cls = FlashMoEKernelError if status == ERROR_KERNEL else FlashMoEError
    raise cls(status, message, call)
