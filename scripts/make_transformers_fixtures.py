#!/usr/bin/env python3
"""Regenerates Tests/Fixtures/transformers/: tiny checkpoints written by transformers itself, for the Swift tests.

    python3 scripts/make_transformers_fixtures.py        # needs torch, transformers 5.x, safetensors

For each family (mixtral, qwen2_moe, qwen3_moe, deepseek_v3) it builds the same tiny random 2-layer model as
check_transformers.py, at H=16, I=8 (Qwen2-MoE shared expert 12), E=8, k=2, and writes under <family>/:

  save_pretrained/   config.json + model.safetensors exactly as `save_pretrained` writes them
  state_dict/        config.json + the in-memory state dict (transformers 5.x fused experts) as model.safetensors
  expected.safetensors
                     layer 1's weights stacked as FlashMoE holds them (router, w1, w3, w2, selection_bias,
                     shared_w1, shared_w3, shared_w2, shared_gate), an input x [5, 16] and the block's output for
                     it: y (float32 transformers) and y_f64 (the block run in float64).
"""

import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check_transformers import (FAMILIES, build_model, moe_block, run_block, save_state_dict_checkpoint,  # noqa: E402
                                stacked_weights)

SIZES = dict(hidden=16, inter=8, shared=12, experts=8, top_k=2)
TOKENS = 5


def main() -> int:
    import copy

    import torch
    import transformers
    from safetensors.torch import save_file

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "Tests", "Fixtures", "transformers")
    for i, family in enumerate(FAMILIES):
        model = build_model(family, seed=2026 + i, **SIZES)
        block = moe_block(model)
        out = os.path.join(root, family)
        shutil.rmtree(out, ignore_errors=True)
        saved = os.path.join(out, "save_pretrained")
        model.save_pretrained(saved)
        for extra in os.listdir(saved):
            if extra not in ("config.json", "model.safetensors"):
                os.remove(os.path.join(saved, extra))
        save_state_dict_checkpoint(model, saved, os.path.join(out, "state_dict"))
        x = torch.randn(TOKENS, SIZES["hidden"], generator=torch.Generator().manual_seed(7 + i))
        expected = stacked_weights(block, family)
        expected["x"] = x
        expected["y"] = run_block(block, x).contiguous()
        expected["y_f64"] = run_block(copy.deepcopy(block).double(), x.double()).contiguous()
        save_file(expected, os.path.join(out, "expected.safetensors"),
                  metadata={"transformers": transformers.__version__, "torch": torch.__version__})
        print(f"{family}: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
