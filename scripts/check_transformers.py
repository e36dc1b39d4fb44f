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
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")
#: FlashMoE's --backend values.
BACKENDS = ("cpu", "oracle", "cuda", "auto")
TOKENS = 37


def tiny_config_kwargs(family: str, hidden: int = 64, inter: int = 32, shared: int = 48, experts: int = 8,
                       top_k: int = 2) -> dict:
    """Config fields for a tiny 2-layer model of `family` whose layer 1 is MoE (and layer 0 dense where the family
    allows it)."""
    common = dict(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=64, max_position_embeddings=128, num_experts_per_tok=top_k, hidden_act="silu",
                  tie_word_embeddings=False)
    if family == "mixtral":
        return dict(common, intermediate_size=inter, num_local_experts=experts)
    if family == "qwen2_moe":
        return dict(common, moe_intermediate_size=inter, shared_expert_intermediate_size=shared, num_experts=experts,
                    intermediate_size=2 * hidden, norm_topk_prob=False, decoder_sparse_step=2)
    if family == "qwen3_moe":
        return dict(common, moe_intermediate_size=inter, num_experts=experts, intermediate_size=2 * hidden,
                    norm_topk_prob=True, mlp_only_layers=[0], head_dim=hidden // 4)
    if family == "deepseek_v3":
        return dict(common, moe_intermediate_size=inter, n_routed_experts=experts, n_shared_experts=1, n_group=4,
                    topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5, first_k_dense_replace=1,
                    intermediate_size=2 * hidden, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
                    qk_nope_head_dim=8, v_head_dim=8)
    raise ValueError(f"unknown family {family}")


def dense_layer_zero(family: str) -> bool:
    return family != "mixtral"


def build_model(family: str, seed: int, **sizes):
    """A float32 model of `family` from a tiny config, with layer 1's MoE block randomised like nn.Linear
    (uniform in +-1/sqrt(fan_in)) and DeepSeek's selection bias uniform in +-0.1."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(family, **tiny_config_kwargs(family, **sizes))
    torch.manual_seed(seed)
    try:
        # transformers 5.x picks a grouped-GEMM experts kernel by default, which has no float64 path; the eager
        # loop is the plain reference (and runs in float64 for the second reference).
        model = AutoModelForCausalLM.from_config(config, experts_implementation="eager")
    except (TypeError, ValueError):
        model = AutoModelForCausalLM.from_config(config)
    model = model.float().eval()
    block = moe_block(model)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, tensor in list(block.named_parameters()) + list(block.named_buffers()):
            if not tensor.is_floating_point():
                continue
            if name.endswith("e_score_correction_bias"):
                bound = 0.1
            else:
                bound = 1.0 / math.sqrt(tensor.shape[-1])
            tensor.copy_((torch.rand(tensor.shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound)
    return model


def moe_block(model):
    return model.model.layers[1].mlp


def run_block(block, x):
    """The block's output for x [S, H] (blocks take [B, S, H]; older Mixtral blocks return a tuple)."""
    import torch

    with torch.no_grad():
        y = block(x[None])
    if isinstance(y, tuple):
        y = y[0]
    return y[0]


def stacked_weights(block, family: str) -> dict:
    """The block's weights as FlashMoE's MoEWeights holds them: router [E, H], w1/w3 [E, I, H], w2 [E, H, I],
    selection bias [E], shared w1/w3 [Is, H], w2 [H, Is], shared gate [1, H]. Works for the fused (5.x) and the
    per-expert (4.x) module layouts."""
    import torch

    out = {"router": block.gate.weight.detach().clone()}
    experts = block.experts
    if hasattr(experts, "gate_up_proj"):
        gate_up = experts.gate_up_proj.detach()
        if gate_up.shape[1] != 2 * experts.down_proj.shape[2]:
            raise RuntimeError(f"unexpected fused layout: gate_up_proj {tuple(gate_up.shape)}, "
                               f"down_proj {tuple(experts.down_proj.shape)}")
        inter = gate_up.shape[1] // 2
        out["w1"], out["w3"] = gate_up[:, :inter].clone(), gate_up[:, inter:].clone()
        out["w2"] = experts.down_proj.detach().clone()
    else:
        g, u, d = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        out["w1"] = torch.stack([getattr(e, g).weight.detach() for e in experts])
        out["w3"] = torch.stack([getattr(e, u).weight.detach() for e in experts])
        out["w2"] = torch.stack([getattr(e, d).weight.detach() for e in experts])
    if hasattr(block.gate, "e_score_correction_bias"):
        out["selection_bias"] = block.gate.e_score_correction_bias.detach().float().clone()
    shared = getattr(block, "shared_expert", None)
    if shared is None:
        shared = getattr(block, "shared_experts", None)
    if shared is not None:
        out["shared_w1"] = shared.gate_proj.weight.detach().clone()
        out["shared_w3"] = shared.up_proj.weight.detach().clone()
        out["shared_w2"] = shared.down_proj.weight.detach().clone()
    if getattr(block, "shared_expert_gate", None) is not None:
        out["shared_gate"] = block.shared_expert_gate.weight.detach().clone()
    return {k: v.contiguous() for k, v in out.items()}


def save_state_dict_checkpoint(model, src_dir: str, dst_dir: str) -> None:
    """The in-memory state dict (fused experts, transformers 5.x names) as a single model.safetensors."""
    from safetensors.torch import save_file

    os.makedirs(dst_dir, exist_ok=True)
    shutil.copy(os.path.join(src_dir, "config.json"), os.path.join(dst_dir, "config.json"))
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(dst_dir, "model.safetensors"), metadata={"format": "pt"})


def describe_layout(directory: str) -> str:
    """Which naming the layer-1 experts use in a checkpoint directory."""
    from safetensors import safe_open

    names = []
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = list(json.load(f)["weight_map"])
    else:
        with safe_open(os.path.join(directory, "model.safetensors"), "pt") as f:
            names = list(f.keys())
    layer = [n for n in names if ".layers.1." in n and ".experts." in n]
    if any(n.endswith("experts.gate_up_proj") for n in layer):
        kind = "fused gate_up_proj"
    elif layer:
        kind = "per-expert"
    else:
        kind = "no layer-1 experts?"
    block = "block_sparse_moe" if any(".block_sparse_moe." in n for n in layer) else "mlp"
    return f"{kind} ({block})"


def relative_error(y, ref) -> float:
    denom = float(ref.double().norm())
    return float((y.double() - ref.double()).norm()) / (denom if denom > 0 else 1.0)


def run_cli(binary: str, checkpoint: str, layer: int, x_path: str, y_path: str, backend: str):
    cmd = [binary, "run", "--checkpoint", checkpoint, "--layer", str(layer), "--input", x_path, "--output", y_path,
           "--backend", backend, "--precision", "fp32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return cmd, proc


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
    args = parser.parse_args(argv)
    args.families = comma_list(args.families, FAMILIES, "--families", parser)
    args.backends = comma_list(args.backends, BACKENDS, "--backends", parser)
    return args


def main() -> int:
    args = parse_args()

    binary = os.path.abspath(args.flashmoe)
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        print(f"error: {binary} is not an executable file", file=sys.stderr)
        return 2
    try:
        import torch
        import transformers
        from safetensors.torch import load_file, save_file
    except ImportError as e:
        print(f"error: {e}: this script needs torch, transformers and safetensors", file=sys.stderr)
        return 2
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, flashmoe {binary}")

    families, backends = args.families, args.backends
    root = args.keep or tempfile.mkdtemp(prefix="flashmoe-check-")
    os.makedirs(root, exist_ok=True)
    rows, failures = [], 0

    for i, family in enumerate(families):
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

    print(f"\n{'family':<12} {'checkpoint':<16} {'backend':<8} {'layout':<34} {'vs fp32':>9} {'vs fp64':>9}"
          f"  {'worst token':<20} status")
    for family, label, backend, layout, e32, e64, worst, status in rows:
        print(f"{family:<12} {label:<16} {backend:<8} {layout:<34} {e32:>9.2e} {e64:>9.2e}  {worst:<20} {status}")
    print(f"\n{len(rows) - failures} passed, {failures} failed (tolerance {args.tolerance:g}); files in {root}")
    if not args.keep and failures == 0:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
