#!/usr/bin/env python3
"""Drives the fused MoE kernel straight from Python on a GPU host, for kernel iteration without a Swift rebuild.

Compiles Sources/CKernels/kernels/moe.cu with NVRTC (ctypes), launches it cooperatively through cuda.bindings,
allocates with PyTorch, and checks it against a float64 PyTorch implementation of the same semantics (routing by
logit with ties to the lower index, capacity drops by token order, rank-order combine). Then times a few presets
with CUDA events. This is a developer tool; the product's check is `flashmoe verify`.

usage: python3 scripts/kernel_harness.py [--quick] [--bench]
"""
import argparse, ctypes, glob, math, os, struct, sys, time
import torch

KDIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'Sources', 'CKernels', 'kernels')
NVRTC_PATHS = ['/usr/local/cuda/lib64/libnvrtc.so.13', 'libnvrtc.so.13']

try:
    from cuda.bindings import driver as cu
except ImportError:  # older cuda-python
    from cuda import cuda as cu


def check(r):
    """Unpacks a cuda-python (error, value...) tuple, raising on any error."""
    err, *rest = r if isinstance(r, tuple) else (r,)
    if int(getattr(err, 'value', err)) != 0:
        raise RuntimeError(f'CUDA driver error {err}')
    return rest[0] if len(rest) == 1 else (rest or None)


def nvrtc_compile(defines, arch='sm_90a'):
    lib = None
    for p in NVRTC_PATHS:
        try:
            d = os.path.dirname(p)
            for b in glob.glob(os.path.join(d, 'libnvrtc-builtins.so.*')):
                ctypes.CDLL(b, mode=ctypes.RTLD_GLOBAL)
            lib = ctypes.CDLL(p)
            break
        except OSError:
            continue
    assert lib is not None, 'NVRTC not found'
    files = {os.path.basename(f): open(f, 'rb').read() for f in glob.glob(KDIR + '/*.cu*')}
    names = [n for n in files if n != 'moe.cu']
    prog = ctypes.c_void_p()
    hdrs = (ctypes.c_char_p * len(names))(*[files[n] for n in names])
    inc = (ctypes.c_char_p * len(names))(*[n.encode() for n in names])
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), files['moe.cu'], b'moe.cu', len(names), hdrs, inc) == 0
    opts = [f'--gpu-architecture={arch}', '-std=c++17', '--ptxas-options=-v', '-default-device', '-lineinfo']
    opts += [f'-D{k}={v}' for k, v in defines.items()]
    copts = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    r = lib.nvrtcCompileProgram(prog, len(opts), copts)
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, log)
    if r != 0:
        raise RuntimeError('compile failed:\n' + log.value.decode())
    lib.nvrtcGetCUBINSize(prog, ctypes.byref(n))
    cubin = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetCUBIN(prog, cubin)
    regs = [l for l in log.value.decode().splitlines() if 'registers' in l or 'spill' in l]
    return cubin.raw, regs


PREC = {'fp32': 0, 'tf32': 1, 'bf16': 2, 'fp16': 3}
ACT = {'relu': 0, 'gelu': 1, 'gelu-tanh': 2, 'silu': 3}
DT = {'fp32': torch.float32, 'tf32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}


class Cfg:
    def __init__(self, H, I, E, K, prec='bf16', act='relu', gated=False, bias=False, scoring='softmax', groups=1,
                 kept=1, renorm=True, scale=1.0, shared_i=0, shared_gated=False, cf=None, stages=4, wgmma=True,
                 extra=None):
        self.__dict__.update(locals())
        del self.__dict__['self']

    def defines(self):
        return dict(FMOE_H=self.H, FMOE_I=self.I, FMOE_E=self.E, FMOE_K=self.K, FMOE_PREC=PREC[self.prec],
                    FMOE_ACT=ACT[self.act], FMOE_GATED=int(self.gated), FMOE_BIAS=int(self.bias),
                    FMOE_SCORING=0 if self.scoring == 'softmax' else 1, FMOE_GROUPS=self.groups,
                    FMOE_GROUPS_KEPT=self.kept, FMOE_RENORM=int(self.renorm), FMOE_SCALE=f'{self.scale}f',
                    FMOE_SHARED_I=self.shared_i, FMOE_SHARED_GATED=int(self.shared_gated), FMOE_STAGES=self.stages,
                    FMOE_WGMMA=int(self.wgmma), FMOE_INJECT_FAULT=0, **(self.extra or {}))


def act_fn(name, v):
    if name == 'relu': return torch.relu(v)
    if name == 'gelu': return torch.nn.functional.gelu(v)
    if name == 'gelu-tanh': return torch.nn.functional.gelu(v, approximate='tanh')
    return torch.nn.functional.silu(v)


def n0_cols(c, inter):
    return ((inter + 63) // 64) * 128 if c.gated else inter


def pack_w13(w1, w3, rows):
    """[.., I, H] gate and up → blocks of 2·rows: `rows` gate rows then the matching up rows (I padded)."""
    I = w1.shape[-2]
    nb = (I + rows - 1) // rows
    pad = nb * rows - I
    if pad:
        z = torch.zeros(*w1.shape[:-2], pad, w1.shape[-1], dtype=w1.dtype, device=w1.device)
        w1, w3 = torch.cat([w1, z], -2), torch.cat([w3, z], -2)
    g = w1.reshape(*w1.shape[:-2], nb, rows, w1.shape[-1])
    u = w3.reshape(*w3.shape[:-2], nb, rows, w3.shape[-1])
    return torch.cat([g, u], -2).reshape(*w1.shape[:-2], nb * 2 * rows, w1.shape[-1]).contiguous()


class Layer:
    def __init__(self, c, seed=0, pack_rows=64):
        g = torch.Generator(device='cuda').manual_seed(seed)
        dt = DT[c.prec]
        def u(*shape, fan):
            return ((torch.rand(*shape, generator=g, device='cuda') * 2 - 1) / math.sqrt(fan)).to(dt)
        self.c = c
        EG = c.E + (1 if c.shared_i and c.shared_gated else 0)
        self.wg = u(EG, c.H, fan=c.H)
        self.sel_bias = (torch.rand(c.E, generator=g, device='cuda') * 0.2 - 0.1) if c.scoring == 'sigmoid' else None
        self.w1 = u(c.E, c.I, c.H, fan=c.H)
        self.w3 = u(c.E, c.I, c.H, fan=c.H) if c.gated else None
        self.w2 = u(c.E, c.H, c.I, fan=c.I)
        self.b1 = u(c.E, c.I, fan=c.H).float() if c.bias else None
        self.b2 = u(c.E, c.H, fan=c.I).float() if c.bias else None
        if c.shared_i:
            self.ws1 = u(c.shared_i, c.H, fan=c.H)
            self.ws3 = u(c.shared_i, c.H, fan=c.H) if c.gated else None
            self.ws2 = u(c.H, c.shared_i, fan=c.shared_i)
        self.w1p = pack_w13(self.w1, self.w3, pack_rows) if c.gated else self.w1.contiguous()
        self.ws1p = (pack_w13(self.ws1, self.ws3, pack_rows) if c.gated else self.ws1) if c.shared_i else None
        # The kernel rounds tensor-core operands to TF32 itself (in shared memory, gemm_tile.cuh): weights stay FP32.
        self.w2k, self.ws2k = self.w2, (self.ws2 if c.shared_i else None)


def reference(L, x, capacity):
    c = L.c
    S = x.shape[0]
    xd = x.double()
    logits = xd @ L.wg.double().T
    lr = logits[:, :c.E]
    if c.scoring == 'softmax':
        p = torch.softmax(lr, -1)
        sel = torch.topk(lr, c.K, -1).indices
        w = p.gather(1, sel)
    else:
        s = torch.sigmoid(lr)
        ch = s + L.sel_bias.double()
        if c.groups > 1:
            gs = ch.view(S, c.groups, -1).topk(2, -1).values.sum(-1)
            gi = torch.topk(gs, c.kept, -1).indices
            gm = torch.zeros_like(gs).scatter_(1, gi, 1).bool()
            mask = gm.unsqueeze(-1).expand(S, c.groups, c.E // c.groups).reshape(S, c.E)
            ch = ch.masked_fill(~mask, float('-inf'))
        sel = torch.topk(ch, c.K, -1).indices
        w = s.gather(1, sel)
    if c.renorm:
        w = w / (w.sum(-1, keepdim=True) + (1e-20 if c.scoring == 'sigmoid' else 0))
    w = w * c.scale
    # slots in token order
    onehot = torch.zeros(S, c.E, dtype=torch.long, device=x.device)
    onehot.scatter_(1, sel, 1)
    rank = torch.cumsum(onehot, 0) - onehot
    slot = rank.gather(1, sel)
    kept = slot < capacity
    dt = DT[c.prec]
    def ffn(xr, w1, w3, w2, b1=None, b2=None):
        a = xr @ w1.double().T
        if b1 is not None: a = a + b1.double()
        a = act_fn(c.act, a)
        if w3 is not None: a = a * (xr @ w3.double().T)
        a = a.to(dt).double()
        o = a @ w2.double().T
        if b2 is not None: o = o + b2.double()
        return o
    y = torch.zeros(S, c.H, dtype=torch.float64, device=x.device)
    outs = torch.zeros(S, c.K, c.H, dtype=torch.float64, device=x.device)
    for e in range(c.E):
        tok, j = torch.nonzero((sel == e) & kept, as_tuple=True)
        if tok.numel() == 0: continue
        o = ffn(xd[tok], L.w1[e], L.w3[e] if c.gated else None, L.w2[e], L.b1[e] if c.bias else None,
                L.b2[e] if c.bias else None)
        outs[tok, j] = o
    for j in range(c.K):
        y += torch.where(kept[:, j:j + 1], w[:, j:j + 1] * outs[:, j], torch.zeros((), dtype=torch.float64, device=x.device))
    if c.shared_i:
        o = ffn(xd, L.ws1, L.ws3 if c.gated else None, L.ws2)
        gsh = torch.sigmoid(logits[:, c.E:c.E + 1]) if c.shared_gated else 1.0
        y += gsh * o
    return y, sel, w, kept


class Runner:
    def __init__(self, c, max_tokens):
        self.c = c
        torch.zeros(1, device='cuda')  # makes PyTorch's primary context current on this thread
        cubin, self.regs = nvrtc_compile(c.defines())
        self.mod = check(cu.cuModuleLoadData(cubin))
        self.fn = check(cu.cuModuleGetFunction(self.mod, b'fmoe_forward'))
        self.smem = self.global_int(b'fmoe_dynamic_smem')
        self.pack_rows = self.global_int(b'fmoe_gated_pack_rows')
        self.gate_tiles = self.global_int(b'fmoe_gate_tiles')
        assert self.global_int(b'fmoe_params_bytes') == 392, 'Params layout changed: update params()'
        check(cu.cuFuncSetAttribute(self.fn, cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, self.smem))
        occ = check(cu.cuOccupancyMaxActiveBlocksPerMultiprocessor(self.fn, 256, self.smem))
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        self.grid = occ * sms
        self.sync = torch.zeros(256, dtype=torch.uint8, device='cuda')
        self.err = torch.zeros(48, dtype=torch.uint8, device='cuda')
        self.ring = None
        self.max_tokens = max_tokens
        self.alloc(max_tokens)

    def global_int(self, name):
        dptr, size = check(cu.cuModuleGetGlobal(self.mod, name))
        buf = ctypes.c_int32()
        check(cu.cuMemcpyDtoH(ctypes.addressof(buf), dptr, 4))
        return buf.value

    def alloc(self, S):
        c = self.c
        EG = c.E + (1 if c.shared_i and c.shared_gated else 0)
        tiles = (S + 127) // 128
        R = S * c.K
        RB = R // 128 + c.E + tiles + 2
        self.row_blocks = RB
        i32 = lambda n: torch.zeros(max(n, 1), dtype=torch.int32, device='cuda')
        f32 = lambda n: torch.zeros(max(n, 1), dtype=torch.float32, device='cuda')
        dt = DT[c.prec]
        self.ws = dict(
            logits=f32(S * EG), logits_part=f32(min(4 * S, 128 * self.grid) * EG), rank=i32(S * c.K), sgate=f32(S), tile_done=i32(tiles), counts=i32(tiles * c.E),
            base=i32(tiles * c.E), load=i32(c.E), row_start=i32(c.E + 2), rb_start=i32(c.E + 2), t0=i32(c.E + 2),
            row_token=i32(R), target=i32(S), pending=i32(S), done0=i32(RB), done1=i32(RB),
            ring=torch.zeros(RB, dtype=torch.int64, device='cuda'),
            clist=torch.zeros(max(S, 1), dtype=torch.int64, device='cuda'),
            hbuf=torch.zeros(max(R * c.I, 1), dtype=dt, device='cuda'),
            hs=torch.zeros(max(S * max(c.shared_i, 1), 1), dtype=dt, device='cuda'),
            ybuf=f32(R * c.H), ys=f32(S * c.H if c.shared_i else 1),
            ids=i32(S * c.K), wts=f32(S * c.K), slot=i32(S * c.K))

    def params(self, L, x, y, capacity, budget_ns=2_000_000_000):
        w = self.ws
        ptr = lambda t: 0 if t is None else t.data_ptr()
        ptrs = [x, L.wg, L.sel_bias, L.w1p, L.w2k, L.b1, L.b2, L.ws1p if self.c.shared_i else None,
                L.ws2k if self.c.shared_i else None, y, w['ids'], w['wts'], w['slot'], w['logits'], w['logits_part'], w['rank'],
                w['sgate'], w['tile_done'], w['counts'], w['base'], w['load'], w['row_start'], w['rb_start'],
                w['t0'], w['row_token'], w['target'], w['pending'], w['done0'], w['done1'], w['ring'], w['clist'], w['hbuf'],
                w['hs'], w['ybuf'], w['ys'], self.sync, self.err, None, None, None,  # peers .. rows_sent: ranks only
                None]  # err_mirror: none (error() reads the record itself)
        S = x.shape[0]
        gate_split = max(1, min(4, self.grid // (max(1, (S + 127) // 128) * self.gate_tiles)))
        part_rows = min(4 * self.max_tokens, 128 * self.grid)  # rows logits_part holds, all K slices (alloc)
        # The epoch lives on the device (the kernel reads sync->epoch and advances it); the field is unused here.
        blob = struct.pack('<41Q', *[ptr(t) for t in ptrs]) + struct.pack(
            '<10i', S, capacity, 0, gate_split, self.row_blocks, self.max_tokens, part_rows, 0, 0, 0) + struct.pack(
            '<QQQ', 0, budget_ns, 2**32 - 1)
        return blob

    def launch(self, L, x, y, capacity=2**31 - 1, stream=0):
        blob = self.params(L, x, y, capacity)
        buf = ctypes.create_string_buffer(blob, len(blob))
        arr = (ctypes.c_void_p * 1)(ctypes.addressof(buf))
        self._keep = (buf, arr)
        check(cu.cuLaunchCooperativeKernel(self.fn, self.grid, 1, 1, 256, 1, 1, self.smem,
                                           cu.CUstream(torch.cuda.current_stream().cuda_stream), ctypes.addressof(arr)))

    def error(self):
        e = self.err.cpu().numpy().tobytes()
        code, phase, index, rank, expected, seen = struct.unpack('<IIIIQQ', e[:32])
        return None if code == 0 else dict(code=code, phase=phase, index=index, rank=rank, expected=expected, seen=seen)


def run_check(name, c, S, cf=None, seed=1, force_one=False):
    r = Runner(c, S)
    L = Layer(c, seed, r.pack_rows)
    if force_one:  # all tokens to expert 3 through the router weights
        L.wg.zero_()
        L.wg[3 % c.E] = 1.0 / c.H
    g = torch.Generator(device='cuda').manual_seed(seed + 100)
    x = torch.randn(S, c.H, generator=g, device='cuda').to(DT[c.prec])
    if force_one:
        x = x.abs()
    cap = 2**31 - 1 if cf is None else math.ceil(((S + c.E - 1) // c.E) * c.K * cf)
    y = torch.full((S, c.H), float('nan'), device='cuda')
    r.launch(L, x, y, cap)
    torch.cuda.synchronize()
    err = r.error()
    yref, sel, w, kept = reference(L, x, cap)
    ids = r.ws['ids'][:S * c.K].view(S, c.K).long()
    idmis = (ids != sel).any(-1).sum().item()
    ok_rows = ~(ids != sel).any(-1)
    rel = ((y.double() - yref)[ok_rows].norm() / yref[ok_rows].norm().clamp_min(1e-30)).item() if S else 0.0
    y2 = torch.full((S, c.H), float('nan'), device='cuda')
    r.launch(L, x, y2, cap)
    torch.cuda.synchronize()
    same = torch.equal(y, y2)
    tol = {'fp32': 1e-5, 'tf32': 2e-3, 'bf16': 1e-2, 'fp16': 1e-2}[c.prec]
    ok = err is None and rel < tol and same and idmis <= max(1, S // 200) and not torch.isnan(y).any()
    print(f'{"PASS" if ok else "FAIL"} {name:34s} S={S:5d} rel={rel:.2e} id_mismatch={idmis} bitwise={same} '
          f'dropped={(~kept).sum().item()} err={err} grid={r.grid} {r.regs[-1].strip() if r.regs else ""}', flush=True)
    return ok


def bench(name, c, S, iters=20):
    r = Runner(c, S)
    L = Layer(c, 3, r.pack_rows)
    x = torch.randn(S, c.H, device='cuda').to(DT[c.prec])
    y = torch.empty(S, c.H, device='cuda')
    for _ in range(5): r.launch(L, x, y)
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); r.launch(L, x, y); b.record(); b.synchronize()
        ts.append(a.elapsed_time(b))
    err = r.error()
    ts.sort()
    med = ts[len(ts) // 2]
    if (c.extra or {}).get('FMOE_TIMING'):
        st = struct.unpack('<16Q', r.sync.cpu().numpy().tobytes()[8:8 + 128])
        names = ['start', 'gate loop left', 'scan seen', 'placed', 'barrier passed', 'end', 'scan start', 'scan end',
                 'route tile0 start', 'route tile0 end']
        print('  TIMING (us from start, last launch): ' + ', '.join(
            f'{n}={(st[i] - st[0]) / 1000:.1f}' for i, n in enumerate(names) if st[i]), flush=True)
    flops = 2 * S * c.H * c.E + 2 * S * c.K * c.H * c.I * (3 if c.gated else 2) + (2 * S * c.H * c.shared_i * (3 if c.gated else 2))
    print(f'BENCH {name:30s} S={S:5d} median {med:.3f} ms  {flops / med / 1e9:.1f} TFLOP/s  grid={r.grid} err={err}', flush=True)


if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--bench', action='store_true')
    ap.add_argument('--quick', action='store_true')
    ap.add_argument('--bench-only', action='store_true')
    a = ap.parse_args()
    torch.manual_seed(0)
    results = []
    checks = [
        ('paper-e64 bf16', Cfg(2048, 2048, 64, 2, 'bf16'), 300),
        ('paper-e64 fp32', Cfg(2048, 2048, 64, 2, 'fp32'), 200),
        ('paper-e64 tf32', Cfg(2048, 2048, 64, 2, 'tf32'), 200),
        ('small fp16 gelu bias S=1', Cfg(64, 96, 8, 2, 'fp16', 'gelu', bias=True), 1),
        ('small fp32 gelu-tanh bias S=127', Cfg(64, 96, 8, 2, 'fp32', 'gelu-tanh', bias=True), 127),
        ('qwen3 bf16 gated', Cfg(2048, 768, 128, 8, 'bf16', 'silu', gated=True), 257),
        ('deepseek-ish sigmoid shared', Cfg(256, 72, 32, 4, 'bf16', 'silu', gated=True, scoring='sigmoid', groups=8, kept=4, scale=2.5, shared_i=104), 129),
        ('qwen2-ish shared gated fp32', Cfg(128, 40, 16, 4, 'fp32', 'silu', gated=True, renorm=False, shared_i=56, shared_gated=True), 77),
        ('k=E', Cfg(64, 32, 4, 4, 'fp32', 'relu'), 50),
        ('capacity cf=1', Cfg(128, 64, 8, 2, 'fp32'), 300, 1.0),
        ('all to one expert', Cfg(128, 64, 8, 1, 'fp32'), 200, None, True),
        ('E=512 k=16', Cfg(128, 64, 512, 16, 'bf16'), 130),
        ('paper-e64 bf16 mma.sync', Cfg(2048, 2048, 64, 2, 'bf16', stages=4, wgmma=False), 300),
        ('qwen3 fp16 gated S=129', Cfg(2048, 768, 128, 8, 'fp16', 'silu', gated=True), 129),
        ('I not multiple of 64 tf32', Cfg(136, 200, 8, 2, 'tf32', 'silu', gated=True), 333),
    ]
    if a.quick: checks = checks[:1]
    if a.bench_only: checks = []
    for item in checks:
        n, c, S = item[:3]
        cf = item[3] if len(item) > 3 else None
        f1 = item[4] if len(item) > 4 else False
        try:
            results.append(run_check(n, c, S, cf, force_one=f1))
        except Exception as ex:
            print(f'FAIL {n}: {ex}', flush=True)
            results.append(False)
    if a.bench:
        for n, c, S in [('paper-e64 bf16', Cfg(2048, 2048, 64, 2, 'bf16'), 8192),
                        ('paper-e64 tf32', Cfg(2048, 2048, 64, 2, 'tf32'), 8192),
                        ('paper-e32 bf16', Cfg(2048, 2048, 32, 2, 'bf16'), 8192),
                        ('qwen3 bf16', Cfg(2048, 768, 128, 8, 'bf16', 'silu', gated=True), 4096),
                        ('qwen3 decode bf16', Cfg(2048, 768, 128, 8, 'bf16', 'silu', gated=True), 64),
                        ('paper-e64 bf16 timing', Cfg(2048, 2048, 64, 2, 'bf16', extra=dict(FMOE_TIMING=1)), 8192),
                        ('paper-e64 tf32 timing', Cfg(2048, 2048, 64, 2, 'tf32', extra=dict(FMOE_TIMING=1)), 8192),
                        ('qwen3 bf16 timing', Cfg(2048, 768, 128, 8, 'bf16', 'silu', gated=True, extra=dict(FMOE_TIMING=1)), 4096),
                        ('qwen3 decode timing', Cfg(2048, 768, 128, 8, 'bf16', 'silu', gated=True, extra=dict(FMOE_TIMING=1)), 64),
                        ('mixtral bf16 timing', Cfg(4096, 14336, 8, 2, 'bf16', 'silu', gated=True, extra=dict(FMOE_TIMING=1)), 4096),
                        ('mixtral bf16', Cfg(4096, 14336, 8, 2, 'bf16', 'silu', gated=True), 4096),
                        ('deepseek-v3 bf16', Cfg(7168, 2048, 256, 8, 'bf16', 'silu', gated=True, scoring='sigmoid', groups=8, kept=4, scale=2.5, shared_i=2048), 4096),
                        ('deepseek-v3 decode bf16', Cfg(7168, 2048, 256, 8, 'bf16', 'silu', gated=True, scoring='sigmoid', groups=8, kept=4, scale=2.5, shared_i=2048), 64)]:
            try:
                bench(n, c, S)
            except Exception as ex:
                print(f'BENCH FAIL {n}: {ex}', flush=True)
    print(f'{sum(results)}/{len(results)} checks passed')
    sys.exit(0 if all(results) else 1)
