#!/usr/bin/env python3
"""Checks that FlashMoE loads Hugging Face MoE checkpoints and computes what transformers' own MoE block computes.

Run on the GPU host (Python 3.12, torch, transformers 5.x, safetensors; no network needed):

    python3 scripts/check_transformers.py bin/flashmoe                # every family, --backend cpu
    python3 scripts/check_transformers.py bin/flashmoe --backends cpu,oracle,cuda --keep /tmp/moe-check

`--backends` takes FlashMoE's --backend values: cpu (fast FP32 path), oracle (Float64), cuda (the fused GPU
operator, which supports these tiny shapes: H, I and the shared I are multiples of 8) and auto. Every run is fp32.

For each family (mixtral, qwen2_moe, qwen3_moe, deepseek_v3) it builds a tiny random 2-layer model with
`from_config` in float32 (fixed seed), randomises the MoE block of layer 1 (router, experts, shared expert and its
gate, DeepSeek's e_score_correction_bias), and writes two checkpoints:

  * `save_pretrained`: what transformers itself writes (5.x reverts its fused in-memory experts to the hub's
    per-expert names, and Mixtral's `mlp` back to `block_sparse_moe`);
  * `state_dict`: the in-memory names and fused layout (`mlp.experts.gate_up_proj` [E, 2I, H], `down_proj`),
    saved directly with safetensors, to exercise the loader's fused path.

It saves a random x [S, H] (S = 37) as `x.safetensors` (tensor `x`), runs the block on it in float32 and in
float64, then runs

    FLASHMOE run --checkpoint DIR --layer 1 --input x.safetensors --output y.safetensors --backend B --precision fp32

and compares `y` with both references: relative error ||y - ref|| / ||ref|| must stay below --tolerance (1e-5).
Where layer 0 is dense (qwen2_moe: decoder_sparse_step 2; qwen3_moe: mlp_only_layers [0]; deepseek_v3:
first_k_dense_replace 1) it also checks that `--layer 0` is refused with a non-zero exit status.

Exit status: 0 when every check passes, 1 when one fails, 2 when the setup is wrong (binary or packages missing).

FP8 (opt-in: `--precisions fp8`, or `fp32,fp8` for both; qwen3_moe and deepseek_v3, the families with published
FP8 checkpoints). It builds the same kind of tiny model at the sizes FP8 blocks need (H = 256, I = 384: multiples
of 128, because transformers' activation quantization wants K % 128 == 0 and its fused gate_up scales stack the
gate's and the up's block rows; FlashMoE's GPU path wants multiples of 16), gives every 128 x 128 weight block of
the MoE block a magnitude of its own (factors 2^-1.5 to 2^1.5, so a scale read from the wrong block shows) and
every (token, 128-channel group) of x one too, rounds the router and x to BF16 values, and writes the checkpoint in
the hub's format (DeepSeek-V3, Qwen3-*-FP8): every linear weight but the router, the embeddings and lm_head as
F8_E4M3 with `<name>_scale_inv` F32 [ceil(out/128), ceil(in/128)] (scale = amax/448 per 128 x 128 block, code =
E4M3(w / scale), round to nearest even), everything else BF16 (DeepSeek's e_score_correction_bias F32), and
config.json's `quantization_config` ({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
"weight_block_size": [128, 128]}; Qwen3's without fmt and with `modules_to_not_convert` naming lm_head and the
routers, as the Qwen3 FP8 releases have it). It then compares (relative error, limit in brackets):

  * `B vs emulated fp8`: FlashMoE `--precision fp8 --backend B` against a float64 emulation of FlashMoE's fp8
    arithmetic (docs/fp8.md: x and h quantized per token and 128-channel group, amax/448 scales, h rounded to
    BF16 first, the shared expert in BF16) on transformers' own routing [5e-3 on the CPU backends, 5e-2 on cuda
    and auto: FlashMoE's Precision.fp8.tolerance(for:), the GPU's FP8 MMA truncating its block sums];
  * `B vs dequantized f64`: against the block in float64 with the dequantized weights and no activation
    quantization [--fp8-tolerance, 8e-2]: what FP8 activations cost (E4M3 keeps 3 fraction bits, so a quantized
    value is off by up to 1/16 of itself; 3 to 5 % in a simulation of 20 such layers);
  * `cuda vs cpu` [5e-2, the GPU's fp8 tolerance];
  * `B vs transformers fp8`: against transformers itself, the checkpoint loaded with `from_pretrained` on the GPU
    in float32 with its FP8Linear / FP8Experts layers (eager experts; activations quantized by the same rule
    inside its kernels-community/finegrained-fp8 kernel) [--fp8-tolerance, 8e-2]: the two round h differently
    (FlashMoE to BF16 before quantizing) and DeepSeek's shared expert is FP8 in transformers but BF16 in FlashMoE,
    up to ~4 % apart in simulation; `transformers fp8 vs its emulation` [5e-2] checks that transformers computes
    the arithmetic this script assumes. transformers 5.x loads that kernel from the Hub through the `kernels`
    package; without it (no network, no `kernels`) its FP8 rows are a SKIP with the reason, and the same
    transformers layers are run again with a pure-PyTorch stand-in for the kernel (`torch_standin_kernels`: its
    documented arithmetic, exact sums), labelled `transformers fp8 [stand-in]`;
  * `transformers dequantized vs ours`: the checkpoint loaded with FineGrainedFP8Config(dequantize=True), run in
    float64, against the dequantized reference [--tolerance]: that transformers reads the file as this script
    wrote it.

Measured on the H200 (torch 2.11, transformers 5.17, no `kernels` package; qwen3_moe / deepseek_v3): cpu vs
emulated 3.5e-7 / 2.2e-5, oracle 5.9e-8 / 5.0e-8, cuda 3.5e-3 / 4.4e-3; vs dequantized f64 4.2e-2 / 3.7e-2; vs
transformers fp8 [stand-in] 1.1e-2 / 2.1e-2, the stand-in vs its emulation 1.4e-7 / 9.2e-8; transformers
dequantized vs ours 4.3e-8 / 4.1e-8. One pair of block scales swapped in the qwen3_moe checkpoint (expert 0's
down_proj, or expert 3's gate_proj) moved FlashMoE's output by 6.2e-2 and 1.1e-1 on cpu and cuda alike.

Anything transformers cannot do (no GPU, no accelerate, a layer it leaves unloaded) is a SKIP with the reason, not
a failure. fp8 mode sets HF_HUB_OFFLINE=1 unless the environment sets it, and FLASHMOE_EXPERIMENTAL_FP8=1 for
FlashMoE (its GPU fp8 path is experimental). GPU host:

    python3 scripts/check_transformers.py bin/flashmoe --precisions fp8 --backends cpu,oracle,cuda

The fp8 case's code lives in scripts/transformers_fp8.py, and what both cases use (the tiny models, running the
block, `flashmoe run`) in scripts/transformers_common.py; this file holds the fp32 checks, the command line and
the report.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import tempfile
import traceback

# transformers_common and transformers_fp8 sit beside this file: `python3 scripts/check_transformers.py` puts their
# folder on sys.path itself, an importer elsewhere may not.
if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# build_model, moe_block, run_block, stacked_weights and tiny_config_kwargs are imported from this module by
# scripts/make_transformers_fixtures.py and python/tests as well.
from transformers_common import (TOKENS, build_model, describe_layout, first_line, moe_block,  # noqa: E402,F401
                                 relative_error, run_block, run_cli, stacked_weights, tiny_config_kwargs)
from transformers_fp8 import FP8_FAMILIES, FP8_LIMIT_E4M3, check_torch_fp8_rules, run_fp8_family  # noqa: E402

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")
#: FlashMoE's --backend values.
BACKENDS = ("cpu", "oracle", "cuda", "auto")
#: --precisions values: fp32 (the checks above, the default) and fp8 (the FP8 checkpoint checks).
PRECISIONS = ("fp32", "fp8")


def dense_layer_zero(family: str) -> bool:
    return family != "mixtral"


def save_state_dict_checkpoint(model, src_dir: str, dst_dir: str) -> None:
    """The in-memory state dict (fused experts, transformers 5.x names) as a single model.safetensors."""
    from safetensors.torch import save_file

    os.makedirs(dst_dir, exist_ok=True)
    shutil.copy(os.path.join(src_dir, "config.json"), os.path.join(dst_dir, "config.json"))
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(dst_dir, "model.safetensors"), metadata={"format": "pt"})


def comma_list(text: str, allowed: tuple[str, ...], option: str, parser: argparse.ArgumentParser) -> list[str]:
    """Splits a comma list, keeps order, drops repeats; unknown or no names end in `parser.error` (status 2)."""
    items = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        parser.error(f"{option}: {'unknown ' + ', '.join(bad) if bad else 'empty'}; choose from {', '.join(allowed)}")
    return items


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with --families and --backends split into checked lists (no torch needed)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("flashmoe", help="path of the flashmoe binary")
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated model_type list")
    parser.add_argument("--backends", default="cpu",
                        help=f"comma-separated --backend values to run ({', '.join(BACKENDS)})")
    parser.add_argument("--tolerance", type=float, default=1e-5, help="largest relative error accepted")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--keep", help="write the checkpoints here and keep them (default: a temporary directory)")
    parser.add_argument("--precisions", help=f"comma-separated: fp32 (the default: transformers' float blocks) and "
                        f"fp8 (FP8 checkpoints of {', '.join(FP8_FAMILIES)}; see above)")
    parser.add_argument("--fp8", action="store_true", help="shorthand for --precisions fp8")
    parser.add_argument("--fp8-tolerance", type=float, default=FP8_LIMIT_E4M3,
                        help="largest relative error of the fp8 comparisons whose sides quantize activations "
                             "differently or not at all (against the dequantized float64 block and transformers' "
                             f"FP8 layers; default {FP8_LIMIT_E4M3:g})")
    args = parser.parse_args(argv)
    args.families = comma_list(args.families, FAMILIES, "--families", parser)
    args.backends = comma_list(args.backends, BACKENDS, "--backends", parser)
    if args.fp8 and args.precisions is not None and "fp8" not in args.precisions.split(","):
        parser.error(f"--fp8 asks for fp8 but --precisions says {args.precisions}")
    args.precisions = comma_list(args.precisions or ("fp8" if args.fp8 else "fp32"), PRECISIONS, "--precisions",
                                 parser)
    args.fp8_families = [f for f in args.families if f in FP8_FAMILIES] if "fp8" in args.precisions else []
    if "fp8" in args.precisions and not args.fp8_families:
        parser.error(f"--precisions fp8: the fp8 cases are for {', '.join(FP8_FAMILIES)} (the families with "
                     f"published FP8 checkpoints), and --families names neither")
    return args


def main() -> int:
    args = parse_args()

    binary = os.path.abspath(args.flashmoe)
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        print(f"error: {binary} is not an executable file", file=sys.stderr)
        return 2
    if "fp8" in args.precisions:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network: fail fast where transformers wants the Hub
    try:
        import torch
        import transformers
        from safetensors.torch import load_file, save_file
    except ImportError as e:
        print(f"error: {e}: this script needs torch, transformers and safetensors", file=sys.stderr)
        return 2
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, flashmoe {binary}")
    if "fp8" in args.precisions:
        if not hasattr(torch, "float8_e4m3fn"):
            print(f"error: torch {torch.__version__} has no float8_e4m3fn: the fp8 cases need torch 2.1 or later",
                  file=sys.stderr)
            return 2
        problem = check_torch_fp8_rules()
        if problem:
            print(f"error: {problem}: the fp8 cases quantize by FlashMoE's rules (docs/fp8.md), which this torch "
                  f"does not follow", file=sys.stderr)
            return 2

    families, backends = args.families, args.backends
    root = args.keep or tempfile.mkdtemp(prefix="flashmoe-check-")
    os.makedirs(root, exist_ok=True)
    rows, failures = [], 0

    for i, family in enumerate(families if "fp32" in args.precisions else ()):
        model = build_model(family, seed=args.seed + 100 * i)
        block = moe_block(model)
        print(f"\n== {family}: {type(block).__name__}, experts module {type(block.experts).__name__}")
        fam_dir = os.path.join(root, family)
        saved = os.path.join(fam_dir, "save_pretrained")
        model.save_pretrained(saved)
        fused = os.path.join(fam_dir, "state_dict")
        save_state_dict_checkpoint(model, saved, fused)

        gen = torch.Generator().manual_seed(args.seed + 100 * i + 7)
        x = torch.randn(TOKENS, model.config.hidden_size, generator=gen, dtype=torch.float32)
        x_path = os.path.join(fam_dir, "x.safetensors")
        save_file({"x": x.contiguous()}, x_path)
        y32 = run_block(block, x)
        y64 = run_block(copy.deepcopy(block).double(), x.double())
        print(f"   float32 vs float64 transformers: rel. error {relative_error(y32, y64):.2e}")

        for label, ckpt in (("save_pretrained", saved), ("state_dict", fused)):
            layout = describe_layout(ckpt)
            print(f"   {label}: layer-1 experts stored {layout}")
            for backend in backends:
                y_path = os.path.join(fam_dir, f"y-{label}-{backend}.safetensors")
                cmd, proc = run_cli(binary, ckpt, 1, x_path, y_path, backend)
                status, e32, e64, worst = "FAIL", float("nan"), float("nan"), ""
                if proc.returncode != 0:
                    print(f"   $ {' '.join(cmd)}\n   exit {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
                else:
                    out = load_file(y_path)
                    y = out["y"] if "y" in out else next(iter(out.values()))
                    if "y" not in out:
                        print(f"   note: {y_path} has no tensor 'y', used '{next(iter(out))}'")
                    if tuple(y.shape) != tuple(y32.shape):
                        print(f"   output shape {tuple(y.shape)}, expected {tuple(y32.shape)}")
                    else:
                        e32, e64 = relative_error(y, y32), relative_error(y, y64)
                        per_token = (y.double() - y64).norm(dim=1) / y64.norm(dim=1).clamp_min(1e-30)
                        t = int(per_token.argmax())
                        worst = f"token {t}: {float(per_token[t]):.1e}"
                        status = "ok" if max(e32, e64) < args.tolerance else "FAIL"
                failures += status != "ok"
                rows.append((family, label, backend, layout, e32, e64, worst, status))

        if dense_layer_zero(family):
            y_path = os.path.join(fam_dir, "y-dense.safetensors")
            cmd, proc = run_cli(binary, saved, 0, x_path, y_path, backends[0])
            message = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
            ok = proc.returncode != 0
            print(f"   --layer 0 (dense): exit {proc.returncode}: {message[-1] if message else '(no message)'}")
            failures += not ok
            rows.append((family, "save_pretrained", backends[0], "layer 0 is dense: must be refused",
                         float("nan"), float("nan"), f"exit {proc.returncode}", "ok" if ok else "FAIL"))

    fp8_rows = []
    for family in args.fp8_families:
        try:
            seed = args.seed + 100 * FAMILIES.index(family) + 50
            fp8_rows += run_fp8_family(args, binary, root, family, seed=seed)
        except Exception as e:  # noqa: BLE001 - one family's breakage is its FAIL row, the others still run
            traceback.print_exc()
            print(f"   FAIL  fp8 case of {family}: {type(e).__name__}: {first_line(e)}")
            fp8_rows.append((family, "fp8 case", float("nan"), float("nan"), "", "FAIL", first_line(e)))

    if "fp32" in args.precisions:
        print(f"\n{'family':<12} {'checkpoint':<16} {'backend':<8} {'layout':<34} {'vs fp32':>9} {'vs fp64':>9}"
              f"  {'worst token':<20} status")
        for family, label, backend, layout, e32, e64, worst, status in rows:
            print(f"{family:<12} {label:<16} {backend:<8} {layout:<34} {e32:>9.2e} {e64:>9.2e}  {worst:<20} {status}")
    if "fp8" not in args.precisions:
        print(f"\n{len(rows) - failures} passed, {failures} failed (tolerance {args.tolerance:g}); files in {root}")
    else:
        print(f"\n{'family':<12} {'fp8 comparison':<46} {'rel. err':>9} {'limit':>7}  {'worst token':<20} status")
        for family, comparison, err, limit, worst, status, note in fp8_rows:
            tail = f"SKIP ({note})" if status == "SKIP" else status
            print(f"{family:<12} {comparison:<46} {err:>9.2e} {limit:>7.0e}  {worst:<20} {tail}")
        failures += sum(r[5] == "FAIL" for r in fp8_rows)
        passed = len(rows) + sum(r[5] != "SKIP" for r in fp8_rows) - failures
        skipped = sum(r[5] == "SKIP" for r in fp8_rows)
        print(f"\n{passed} passed, {failures} failed, {skipped} skipped (tolerance {args.tolerance:g}, fp8 limits "
              f"as tabled); files in {root}")
    if not args.keep and failures == 0:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
