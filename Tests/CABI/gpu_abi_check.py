#!/usr/bin/env python3
"""The GPU backend of the C ABI (include/flashmoe.h) from Python's ctypes, on a GPU host (no Swift, no torch).

Device memory comes from the CUDA driver API (libcuda.so.1 through ctypes). Every GPU layer is compared with the
same layer on the library's CPU backend (host pointers, FP32 arithmetic) within the precision's tolerance
(fp32 1e-5, tf32 2e-3, bf16 1e-2):

  - a gated softmax layer with a gated shared expert and a partial last packing block, weights in the fused and in
    the separate layout, in fp32, tf32 and bf16 (bf16 output in float32 and in the storage type);
  - a plain sigmoid layer with groups, selection bias, biases and scaling;
  - the caller's weights freed right after create (the layer keeps its own copy);
  - a forward on a created (non-blocking) stream and on the legacy stream; tokens = 0; info;
  - argument errors on the GPU: tokens > max_tokens, a misaligned x, NULL y;
  - a CUDA graph: one captured forward replayed 20 times with new input values, each equal to the CPU layer;
  - FLASHMOE_FLAG_INJECT_FAULT: the first forward's kernel gives up on a wait; flashmoe_layer_check reports
    FLASHMOE_ERROR_KERNEL; the next forward runs and is correct;
  - FLASHMOE_PRECISION_FP8 (FLASHMOE_EXPERIMENTAL_FP8=1 is set here): bfloat16 experts quantized at create, and
    E4M3 codes with block scales (python/tests/reference.py's quantize_blocks, the library's rule) in the fused and
    the separate layout: the three GPU layers' y equal bit for bit, and within 5e-2 of the CPU layer.

Prints a line per failed check and "N passed, M failed"; exits 1 on any failure, 2 when no GPU is usable.
Usage (repository root, after scripts/build-lib):
  python3 Tests/CABI/gpu_abi_check.py [--lib lib/libflashmoe.so] [--fp8-only]
"""
import argparse
import ctypes as C
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python" / "tests"))
from reference import blocky, quantize_blocks  # noqa: E402

# MARK: the ABI's structs and constants (include/flashmoe.h; the library checks `size`, so a drift fails loudly)


class Config(C.Structure):
    _fields_ = [("size", C.c_size_t), ("magic", C.c_uint32), ("version", C.c_uint32)] + [
        (n, C.c_int32) for n in ["hidden", "intermediate", "experts", "top_k", "ffn", "activation", "bias",
                                 "router", "renormalize", "groups", "groups_kept", "selection_bias"]
    ] + [("scaling", C.c_float), ("shared_intermediate", C.c_int32), ("shared_gated", C.c_int32),
         ("capacity_factor", C.c_float), ("precision", C.c_int32), ("backend", C.c_int32), ("device", C.c_int32),
         ("output", C.c_int32), ("max_tokens", C.c_int64), ("flags", C.c_uint32), ("wait_budget_ms", C.c_uint32)]


WEIGHT_FIELDS = ["router", "selection_bias", "gate_up", "gate", "up", "down", "b1", "b2", "shared_gate_up",
                 "shared_up", "shared_down", "shared_gate", "gate_up_scale", "gate_scale", "up_scale", "down_scale"]


class Weights(C.Structure):
    _fields_ = [("size", C.c_size_t), ("version", C.c_uint32), ("layout", C.c_int32)] + [
        (n, C.c_void_p) for n in WEIGHT_FIELDS]


class Info(C.Structure):
    _fields_ = [("size", C.c_size_t), ("max_tokens", C.c_int64), ("weight_bytes", C.c_int64),
                ("workspace_bytes", C.c_int64), ("backend", C.c_int32), ("device", C.c_int32),
                ("grid_blocks", C.c_int32), ("reserved", C.c_int32)]


SUCCESS, INVALID_ARGUMENT, KERNEL = 0, 1, 5
CUDA, CPU = 0, 1
FP32, TF32, BF16, FP8 = 0, 1, 2, 4
TOLERANCE = {FP32: 1e-5, TF32: 2e-3, BF16: 1e-2, FP8: 5e-2}
FLAG_INJECT_FAULT = 2

# MARK: the driver


class Driver:
    """The few driver calls the check needs, on device 0's primary context."""

    def __init__(self):
        self.cu = C.CDLL("libcuda.so.1")
        self.call("cuInit", 0)
        dev = C.c_int()
        self.call("cuDeviceGet", C.byref(dev), 0)
        self.ctx = C.c_void_p()
        self.call("cuDevicePrimaryCtxRetain", C.byref(self.ctx), dev)
        self.call("cuCtxSetCurrent", self.ctx)

    def call(self, name, *args):
        r = getattr(self.cu, name)(*args)
        if r != 0:
            raise RuntimeError(f"{name} failed with CUresult {r}")

    def upload(self, array):
        a = np.ascontiguousarray(array)
        p = C.c_uint64()
        self.call("cuMemAlloc_v2", C.byref(p), C.c_size_t(max(a.nbytes, 1)))
        self.call("cuMemcpyHtoD_v2", p, a.ctypes.data_as(C.c_void_p), C.c_size_t(a.nbytes))
        self.call("cuCtxSynchronize")  # a pageable copy may still be in flight; later work runs on other streams
        return p.value

    def alloc(self, nbytes):
        p = C.c_uint64()
        self.call("cuMemAlloc_v2", C.byref(p), C.c_size_t(max(nbytes, 1)))
        return p.value

    def copy_in(self, device, array):
        a = np.ascontiguousarray(array)
        self.call("cuMemcpyHtoD_v2", C.c_uint64(device), a.ctypes.data_as(C.c_void_p), C.c_size_t(a.nbytes))
        self.call("cuCtxSynchronize")

    def download(self, device, dtype, count):
        out = np.empty(count, dtype=dtype)
        self.call("cuMemcpyDtoH_v2", out.ctypes.data_as(C.c_void_p), C.c_uint64(device), C.c_size_t(out.nbytes))
        return out

    def free(self, device):
        self.call("cuMemFree_v2", C.c_uint64(device))

    def stream(self):
        s = C.c_void_p()
        self.call("cuStreamCreate", C.byref(s), 1)  # CU_STREAM_NON_BLOCKING
        return s

    def sync(self, stream=None):
        self.call("cuStreamSynchronize", stream)


# MARK: checks and helpers

passed = failed = 0


def check(ok, what):
    global passed, failed
    if ok:
        passed += 1
    else:
        failed += 1
        print(f"FAIL: {what}", flush=True)


def to_bf16(a):
    b = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16(u):
    return (u.astype(np.uint32) << 16).view(np.float32)


def storage(a, precision):
    """The array in the precision's storage type (bf16 as uint16 bits; fp8 stores x in bf16)."""
    return to_bf16(a) if precision in (BF16, FP8) else np.ascontiguousarray(a, dtype=np.float32)


class Layer:
    def __init__(self, lib, config, weights):
        self.lib = lib
        self.handle = C.c_void_p()
        self.status = lib.flashmoe_layer_create(C.byref(config), C.byref(weights), C.byref(self.handle))
        self.message = lib.flashmoe_last_error().decode() if self.status != SUCCESS else ""

    def destroy(self):
        if self.handle:
            self.lib.flashmoe_layer_destroy(self.handle)
            self.handle = C.c_void_p()


def make_config(shape, precision, backend, max_tokens, **fields):
    c = Config()
    c.size, c.magic, c.version = C.sizeof(Config), 0x464D4F45, LIB_VERSION
    c.hidden, c.intermediate, c.experts, c.top_k = shape
    defaults = dict(ffn=1, activation=3, router=0, renormalize=1, groups=1, groups_kept=1, scaling=1.0,
                    wait_budget_ms=0)
    for k, v in {**defaults, **fields}.items():
        setattr(c, k, v)
    c.precision, c.backend, c.max_tokens = precision, backend, max_tokens
    return c


def make_weights(pointers, layout):
    w = Weights()
    w.size, w.version, w.layout = C.sizeof(Weights), LIB_VERSION, layout
    for k, v in pointers.items():
        setattr(w, k, v)
    return w


def layer_pair(lib, shape, precision, max_tokens, host, dev, layout, fields, cpu_fields=None):
    """The same layer on the GPU (device copies `dev`) and on the CPU backend (host arrays `host`)."""
    gpu = Layer(lib, make_config(shape, precision, CUDA, max_tokens, **fields),
                make_weights({k: C.c_void_p(v) for k, v in dev.items()}, layout))
    cpu = Layer(lib, make_config(shape, precision, CPU, max_tokens, **(cpu_fields or fields)),
                make_weights({k: v.ctypes.data_as(C.c_void_p) for k, v in host.items()}, layout))
    return gpu, cpu


def release(drv, dev, *layers):
    for p in dev.values():
        drv.free(p)
    for layer in layers:
        layer.destroy()


def gated_arrays(rng, H, I, E, IS):
    u = lambda shape, fan: rng.uniform(-1, 1, shape).astype(np.float32) / np.sqrt(fan)
    return dict(router=u((E, H), H), gate=u((E, I, H), H), up=u((E, I, H), H), down=u((E, H, I), I),
                shared_gate_up=np.concatenate([u((IS, H), H), u((IS, H), H)]), shared_down=u((H, IS), IS),
                shared_gate=u((H,), H))


def host_and_device_pointers(drv, arrays, precision, layout, float32_fields=()):
    """The arrays as host storage arrays (kept alive) and as device copies, in `layout` (0 fused, 1 separate)."""
    a = dict(arrays)
    if "up" in a:
        if layout == 0:
            a["gate_up"] = np.concatenate([a.pop("gate"), a.pop("up")], axis=1)  # [E, 2I, H]: gate rows first
        elif "shared_gate_up" in a:
            IS = a["shared_gate_up"].shape[0] // 2
            a["shared_up"] = a["shared_gate_up"][IS:]
            a["shared_gate_up"] = a["shared_gate_up"][:IS]
    host = {k: (np.ascontiguousarray(v, np.float32) if k in float32_fields else storage(v, precision))
            for k, v in a.items()}
    device = {k: drv.upload(v) for k, v in host.items()}
    return host, device


def run_layer(lib, drv, layer, x_host, S, H, k, precision, out_float32, stream=None):
    """One GPU forward from host x; y (float32), ids, weights on the host."""
    x = drv.upload(storage(x_host, precision))
    ybytes = 4 if out_float32 or precision not in (BF16, FP8) else 2
    y, ids, w = drv.alloc(S * H * ybytes), drv.alloc(S * k * 4), drv.alloc(S * k * 4)
    st = lib.flashmoe_layer_forward(layer.handle, C.c_void_p(x), C.c_void_p(y), S, C.c_void_p(ids), C.c_void_p(w),
                                    stream)
    drv.sync(stream)
    out = drv.download(y, np.float32 if ybytes == 4 else np.uint16, S * H)
    result = (st, out if ybytes == 4 else from_bf16(out), drv.download(ids, np.int32, S * k),
              drv.download(w, np.float32, S * k))
    for p in (x, y, ids, w):
        drv.free(p)
    return result


def cpu_forward(lib, layer, x_host, S, H, k, precision):
    xs = storage(x_host, precision)
    y = np.empty(S * H, np.float32)
    ids = np.empty(S * k, np.int32)
    w = np.empty(S * k, np.float32)
    st = lib.flashmoe_layer_forward(layer.handle, xs.ctypes.data_as(C.c_void_p), y.ctypes.data_as(C.c_void_p), S,
                                    ids.ctypes.data_as(C.c_void_p), w.ctypes.data_as(C.c_void_p), None)
    return st, y, ids, w


def compare(name, gpu, cpu, precision):
    st, y, ids, w = gpu
    check(st == SUCCESS, f"{name}: GPU forward succeeds")
    err = np.linalg.norm(y - cpu[1]) / max(np.linalg.norm(cpu[1]), 1e-30)
    check(np.isfinite(y).all() and err < TOLERANCE[precision],
          f"{name}: y within {TOLERANCE[precision]} of the CPU backend (relative error {err:.3g})")
    differ = int((ids != cpu[2]).sum())
    # Near-ties may route differently (the GPU sums the gate in another order); y's tolerance covers them.
    check(differ <= max(1, len(ids) // 100), f"{name}: top-k ids agree with the CPU backend ({differ} differ)")
    same = ids == cpu[2]
    werr = float(np.abs(w[same] - cpu[3][same]).max()) if same.any() else 0.0
    check(werr < TOLERANCE[precision] * 10, f"{name}: top-k weights agree (max difference {werr:.3g})")
    print(f"  {name}: relative error {err:.3g}, ids differing {differ}/{len(ids)}", flush=True)


# MARK: the checks


def gated_case(lib, drv, precision, layout, out_float32, rng):
    H, I, E, k, IS, S = 256, 160, 8, 2, 96, 100
    arrays = gated_arrays(rng, H, I, E, IS)
    x = rng.standard_normal((S, H)).astype(np.float32)
    fields = dict(shared_intermediate=IS, shared_gated=1, output=1 if out_float32 else 0)
    host, dev = host_and_device_pointers(drv, arrays, precision, layout)
    name = f"gated {['fp32', 'tf32', 'bf16'][precision]} {['fused', 'separate'][layout]}" + \
        ("" if precision != BF16 else (" float32 y" if out_float32 else " bf16 y"))
    gpu, cpu = layer_pair(lib, (H, I, E, k), precision, 128, host, dev, layout, fields)
    check(gpu.status == SUCCESS, f"{name}: GPU create ({gpu.message})")
    check(cpu.status == SUCCESS, f"{name}: CPU create ({cpu.message})")
    release(drv, dev)  # the GPU layer holds its own copy: its forwards below run after the caller's memory is gone
    if gpu.status == SUCCESS and cpu.status == SUCCESS:
        stream = drv.stream() if layout == 0 else None
        compare(name, run_layer(lib, drv, gpu, x, S, H, k, precision, out_float32, stream),
                cpu_forward(lib, cpu, x, S, H, k, precision), precision)
    return gpu, cpu, x


def plain_sigmoid_case(lib, drv, rng):
    H, I, E, k, S = 128, 96, 16, 4, 77
    u = lambda shape, fan: rng.uniform(-1, 1, shape).astype(np.float32) / np.sqrt(fan)
    arrays = dict(router=u((E, H), H), gate_up=u((E, I, H), H), down=u((E, H, I), I), b1=u((E, I), H),
                  b2=u((E, H), I), selection_bias=rng.uniform(-0.1, 0.1, E).astype(np.float32))
    fields = dict(ffn=0, activation=0, bias=1, router=1, groups=4, groups_kept=2, selection_bias=1, scaling=2.5,
                  output=1)
    host, dev = host_and_device_pointers(drv, arrays, FP32, 0, float32_fields=("b1", "b2", "selection_bias"))
    x = rng.standard_normal((S, H)).astype(np.float32)
    gpu, cpu = layer_pair(lib, (H, I, E, k), FP32, S, host, dev, 0, fields)
    check(gpu.status == SUCCESS and cpu.status == SUCCESS, f"plain sigmoid: create ({gpu.message}{cpu.message})")
    if gpu.status == SUCCESS and cpu.status == SUCCESS:
        compare("plain sigmoid fp32", run_layer(lib, drv, gpu, x, S, H, k, FP32, True),
                cpu_forward(lib, cpu, x, S, H, k, FP32), FP32)
    release(drv, dev, gpu, cpu)


def argument_and_info_checks(lib, drv, gpu):
    info = Info()
    info.size = C.sizeof(Info)
    st = lib.flashmoe_layer_info(gpu.handle, C.byref(info))
    check(st == SUCCESS and info.backend == CUDA and info.max_tokens == 128 and info.grid_blocks > 0
          and info.weight_bytes > 0 and info.workspace_bytes > 0,
          f"info of a GPU layer (grid {info.grid_blocks}, weights {info.weight_bytes} B, "
          f"workspace {info.workspace_bytes} B)")
    x, y = drv.alloc(256 * 256 * 4), drv.alloc(256 * 256 * 4)
    st = lib.flashmoe_layer_forward(gpu.handle, None, None, 0, None, None, None)
    check(st == SUCCESS, "GPU forward with tokens = 0 and NULL x, y")
    for (args, needle, what) in [((C.c_void_p(x), C.c_void_p(y), 129), "tokens", "tokens > max_tokens"),
                                 ((C.c_void_p(x + 4), C.c_void_p(y), 4), "x", "x misaligned by 4 bytes"),
                                 ((C.c_void_p(x), None, 4), "y", "y NULL")]:
        st = lib.flashmoe_layer_forward(gpu.handle, *args, None, None, None)
        msg = lib.flashmoe_last_error().decode()
        check(st == INVALID_ARGUMENT and needle in msg, f"GPU forward with {what}: status {st}, message '{msg}'")
    drv.free(x)
    drv.free(y)
    check(lib.flashmoe_layer_check(gpu.handle, 1, None) == SUCCESS, "check with synchronize on a healthy GPU layer")


def graph_check(lib, drv, gpu, cpu, rng):
    """One captured forward replayed with new inputs: each replay equals the CPU backend."""
    H, k, S = 256, 2, 64
    stream = drv.stream()
    x, y = drv.alloc(S * H * 4), drv.alloc(S * H * 4)
    ids, w = drv.alloc(S * k * 4), drv.alloc(S * k * 4)
    drv.copy_in(x, np.zeros((S, H), np.float32))
    graph, exec_ = C.c_void_p(), C.c_void_p()
    drv.call("cuStreamBeginCapture_v2", stream, 2)  # CU_STREAM_CAPTURE_MODE_RELAXED
    st = lib.flashmoe_layer_forward(gpu.handle, C.c_void_p(x), C.c_void_p(y), S, C.c_void_p(ids), C.c_void_p(w),
                                    stream)
    drv.call("cuStreamEndCapture", stream, C.byref(graph))
    check(st == SUCCESS, f"forward captured into a CUDA graph ({lib.flashmoe_last_error().decode()})")
    drv.call("cuGraphInstantiateWithFlags", C.byref(exec_), graph, C.c_ulonglong(0))
    worst, mismatched = 0.0, 0
    for replay in range(20):
        xs = rng.standard_normal((S, H)).astype(np.float32)
        drv.copy_in(x, xs)
        drv.call("cuGraphLaunch", exec_, stream)
        drv.sync(stream)
        got = drv.download(y, np.float32, S * H)
        want = cpu_forward(lib, cpu, xs, S, H, k, FP32)[1]
        err = np.linalg.norm(got - want) / np.linalg.norm(want)
        worst = max(worst, err)
        mismatched += err >= TOLERANCE[FP32]
    check(mismatched == 0, f"20 graph replays with new inputs equal the CPU backend (worst {worst:.3g})")
    check(lib.flashmoe_layer_check(gpu.handle, 1, stream) == SUCCESS, "no kernel error after the replays")
    drv.call("cuGraphExecDestroy", exec_)
    drv.call("cuGraphDestroy", graph)
    for p in (x, y, ids, w):
        drv.free(p)


def fault_check(lib, drv, rng):
    H, I, E, k, IS, S = 256, 160, 8, 2, 96, 32
    host, dev = host_and_device_pointers(drv, gated_arrays(rng, H, I, E, IS), FP32, 0)
    fields = dict(shared_intermediate=IS, shared_gated=1, output=1, flags=FLAG_INJECT_FAULT, wait_budget_ms=200)
    gpu, cpu = layer_pair(lib, (H, I, E, k), FP32, S, host, dev, 0, fields, cpu_fields={**fields, "flags": 0})
    check(gpu.status == SUCCESS, f"create with FLASHMOE_FLAG_INJECT_FAULT ({gpu.message})")
    if gpu.status != SUCCESS:
        return release(drv, dev, gpu, cpu)
    x = rng.standard_normal((S, H)).astype(np.float32)
    st = run_layer(lib, drv, gpu, x, S, H, k, FP32, True)[0]
    check(st == SUCCESS, "the faulting forward is enqueued")
    st = lib.flashmoe_layer_check(gpu.handle, 1, None)
    msg = lib.flashmoe_last_error().decode()
    check(st == KERNEL and "gave up waiting" in msg, f"check reports the injected fault: status {st}, '{msg}'")
    compare("the forward after a fault", run_layer(lib, drv, gpu, x, S, H, k, FP32, True),
            cpu_forward(lib, cpu, x, S, H, k, FP32), FP32)
    release(drv, dev, gpu, cpu)


def fp8_case(lib, drv, rng):
    """One fp8 layer three ways on the GPU (bf16 experts, E4M3 fused, E4M3 separate) and once on the CPU."""
    H, I, E, k, S = 512, 256, 16, 4, 200
    f = lambda a: from_bf16(to_bf16(a))  # noqa: E731 - bf16-representable float32
    router, gate, up, down = (blocky(rng, (E, H)), blocky(rng, (E, I, H)), blocky(rng, (E, I, H)),
                              blocky(rng, (E, H, I)))
    x = f(rng.standard_normal((S, H)).astype(np.float32))
    gate_up = np.concatenate([gate, up], axis=1)
    (gu, gus, _), (g, gs, _), (u, us, _), (d, ds, _) = map(quantize_blocks, (gate_up, gate, up, down))
    ways = {"bf16 experts": (0, dict(router=to_bf16(router), gate_up=to_bf16(gate_up), down=to_bf16(down))),
            "E4M3 fused": (0, dict(router=to_bf16(router), gate_up=gu, gate_up_scale=gus, down=d, down_scale=ds)),
            "E4M3 separate": (1, dict(router=to_bf16(router), gate=g, up=u, down=d, gate_scale=gs, up_scale=us,
                                      down_scale=ds))}
    ys = {}
    for name, (layout, host) in ways.items():
        dev = {n: drv.upload(a) for n, a in host.items()}
        gpu = Layer(lib, make_config((H, I, E, k), FP8, CUDA, S, output=1),
                    make_weights({n: C.c_void_p(p) for n, p in dev.items()}, layout))
        check(gpu.status == SUCCESS, f"fp8 {name}: GPU create ({gpu.message})")
        release(drv, dev)
        if gpu.status == SUCCESS:
            st, ys[name], _, _ = run_layer(lib, drv, gpu, x, S, H, k, FP8, True)
            check(st == SUCCESS, f"fp8 {name}: GPU forward")
        gpu.destroy()
    host = ways["bf16 experts"][1]
    cpu = Layer(lib, make_config((H, I, E, k), FP8, CPU, S), make_weights(
        {n: a.ctypes.data_as(C.c_void_p) for n, a in host.items()}, 0))
    check(cpu.status == SUCCESS, f"fp8: CPU create ({cpu.message})")
    if cpu.status == SUCCESS and "bf16 experts" in ys:
        want = cpu_forward(lib, cpu, x, S, H, k, FP8)[1]
        first = ys["bf16 experts"]
        for name, y in ys.items():
            check(np.array_equal(y, first), f"fp8 {name}: y equals the bf16 experts' bit for bit")
        err = np.linalg.norm(first - want) / np.linalg.norm(want)
        check(np.isfinite(first).all() and err < TOLERANCE[FP8], f"fp8: GPU within 5e-2 of the CPU layer ({err:.3g})")
        print(f"  fp8: GPU against CPU relative error {err:.3g}", flush=True)
    cpu.destroy()


def main():
    global LIB_VERSION
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lib", default="lib/libflashmoe.so")
    parser.add_argument("--fp8-only", action="store_true", help="run only the fp8 case")
    args = parser.parse_args()
    os.environ["FLASHMOE_EXPERIMENTAL_FP8"] = "1"  # read when a layer is created
    lib = C.CDLL(args.lib)
    lib.flashmoe_last_error.restype = C.c_char_p
    lib.flashmoe_layer_forward.argtypes = [C.c_void_p, C.c_void_p, C.c_void_p, C.c_int64, C.c_void_p, C.c_void_p,
                                           C.c_void_p]
    LIB_VERSION = lib.flashmoe_version()
    try:
        drv = Driver()
    except (OSError, RuntimeError) as e:
        print(f"no usable GPU: {e}")
        return 2
    rng = np.random.default_rng(7)
    fp8_case(lib, drv, rng)
    if args.fp8_only:
        print(f"{passed} passed, {failed} failed")
        return 0 if failed == 0 else 1
    kept = None
    for precision in (FP32, TF32, BF16):
        for layout in (0, 1):
            for out_float32 in ((True, False) if precision == BF16 else (True,)):
                gpu, cpu, _ = gated_case(lib, drv, precision, layout, out_float32, rng)
                if precision == FP32 and layout == 0 and gpu.status == SUCCESS and cpu.status == SUCCESS:
                    kept = (gpu, cpu)
                else:
                    gpu.destroy()
                    cpu.destroy()
    plain_sigmoid_case(lib, drv, rng)
    if kept:
        argument_and_info_checks(lib, drv, kept[0])
        graph_check(lib, drv, kept[0], kept[1], rng)
        kept[0].destroy()
        kept[1].destroy()
    fault_check(lib, drv, rng)
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
