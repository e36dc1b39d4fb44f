"""Tiny random transformers models of each MoE family, from a config (no downloads), for the patch tests on the CPU
(test_torch_cpu.py) and on the GPU (gpu_checks.py).

The configs are scripts/check_transformers.py's (layer 1 MoE, layer 0 dense where the family allows), with as many
key/value heads as heads for DeepSeek-V3 (its attention in transformers 5.17 does not repeat key/value heads). Every
MoE block is randomised like nn.Linear (uniform in ±1/sqrt(fan_in)), DeepSeek's selection bias in ±0.1, so the
experts matter in the logits.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent / "scripts"))

from check_transformers import FAMILIES, tiny_config_kwargs  # noqa: E402

__all__ = ["FAMILIES", "tiny_model", "moe_blocks", "codes_and_scales", "make_fp8_experts"]


def tiny_model(family: str, seed: int = 0, *, device: str = "cpu", dtype=None, **sizes):
    """A float32 (or `dtype`) eval-mode model of `family` with eager experts, on `device`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = tiny_config_kwargs(family, **sizes)
    if family == "deepseek_v3":
        kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
    config = AutoConfig.for_model(family, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, experts_implementation="eager").float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for block in moe_blocks(model):
            for name, tensor in list(block.named_parameters()) + list(block.named_buffers()):
                if tensor.is_floating_point():
                    bound = 0.1 if name.endswith("e_score_correction_bias") else 1.0 / math.sqrt(tensor.shape[-1])
                    tensor.copy_((torch.rand(tensor.shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound)
    model = model.to(device)
    return model.to(dtype) if dtype is not None else model


def moe_blocks(model) -> list:
    """The model's MoE blocks (modules with a router `gate` and `experts`)."""
    return [m for m in model.modules() if hasattr(m, "gate") and hasattr(m, "experts")]


def codes_and_scales(t) -> tuple:
    """A tensor [..., R, C] as float8_e4m3fn codes and float32 block scales [..., ⌈R/128⌉, ⌈C/128⌉], on the CPU, by
    the library's rule (reference.quantize_blocks)."""
    import torch
    from reference import quantize_blocks

    c, s, _ = quantize_blocks(t.detach().float().cpu().numpy())
    return torch.from_numpy(c).view(torch.float8_e4m3fn), torch.from_numpy(s)


def make_fp8_experts(block) -> None:
    """Replaces a transformers 5 block's fused routed experts (`gate_up_proj`, `down_proj`) by float8 codes with
    `*_scale_inv` block scales, as transformers' fine-grained FP8 holds them."""
    import torch

    experts = block.experts
    for name in ("gate_up_proj", "down_proj"):
        codes, scales = codes_and_scales(getattr(experts, name))
        setattr(experts, name, torch.nn.Parameter(codes, requires_grad=False))
        setattr(experts, f"{name}_scale_inv", torch.nn.Parameter(scales, requires_grad=False))
