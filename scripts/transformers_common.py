"""What scripts/check_transformers.py's fp32 checks and its fp8 case (scripts/transformers_fp8.py) both use: the tiny
2-layer model of each family and its layer-1 MoE block, the block's output and its weights as FlashMoE holds them,
which expert layout a checkpoint stores, relative errors, and `flashmoe run`. Imported, never run; torch,
transformers and safetensors are imported inside the functions, so importing it needs none of them.
"""

from __future__ import annotations

import json
import math
import os
import subprocess

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


def worst_token(y, ref) -> str:
    """The token whose output is furthest from `ref`, relatively: 'token t: e'."""
    per_token = (y.double() - ref.double()).norm(dim=1) / ref.double().norm(dim=1).clamp_min(1e-30)
    t = int(per_token.argmax())
    return f"token {t}: {float(per_token[t]):.1e}"


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else "(no message)"


def run_cli(binary: str, checkpoint: str, layer: int, x_path: str, y_path: str, backend: str,
            precision: str = "fp32"):
    cmd = [binary, "run", "--checkpoint", checkpoint, "--layer", str(layer), "--input", x_path, "--output", y_path,
           "--backend", backend, "--precision", precision]
    # The GPU's fp8 path is experimental and off unless asked for (docs/fp8.md).
    env = dict(os.environ, FLASHMOE_EXPERIMENTAL_FP8="1") if precision == "fp8" else None
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    return cmd, proc
