"""Shared pieces of FlashMoE's benchmark scripts, in plain Python (no torch, no numpy).

Holds the preset shapes (mirroring Sources/FlashMoE/Model/Preset.swift), the FLOP and byte counts every benchmark
reports, the roofline floor, the pure-Python reference routers that `torch_moe_baseline.py --check` compares its
vectorised routers against, and the markdown table formatter. Everything here runs on any Python >= 3.10, so the
unit tests (`python3 -m unittest discover -s Benchmarks`) run on a machine without a GPU.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class PresetSpec:
    """One layer shape. `gated` means SwiGLU `(silu(x·Wgᵀ) ⊙ x·Wuᵀ)·Wdᵀ`; otherwise `relu(x·W1ᵀ)·W2ᵀ`."""

    name: str
    hidden: int
    inter: int
    experts: int
    top_k: int
    gated: bool
    router: str  # "softmax" (top-k of softmax, renormalised) or "deepseek" (sigmoid, group-limited)
    tokens: tuple[int, ...]  # token counts benchmarked by default (prefill first, then decode)
    groups: int = 1
    groups_kept: int = 1
    scaling: float = 1.0
    shared_inter: int = 0  # intermediate size of the one shared expert (0: none)

    @property
    def ffn_mats(self) -> int:
        """Weight matrices per expert: 3 for a gated FFN (gate, up, down), 2 for a plain one."""
        return 3 if self.gated else 2


# Exact shapes of Preset.swift; the decode cases (S=64) are the second token count where the brief asks for one.
PRESETS: dict[str, PresetSpec] = {
    p.name: p
    for p in (
        PresetSpec("paper-e64", 2048, 2048, 64, 2, False, "softmax", (8192,)),
        PresetSpec("paper-e32", 2048, 2048, 32, 2, False, "softmax", (8192,)),
        PresetSpec("qwen3-30b-a3b", 2048, 768, 128, 8, True, "softmax", (4096, 64)),
        PresetSpec("mixtral-8x7b", 4096, 14336, 8, 2, True, "softmax", (4096,)),
        PresetSpec(
            "deepseek-v3", 7168, 2048, 256, 8, True, "deepseek", (4096, 64),
            groups=8, groups_kept=4, scaling=2.5, shared_inter=2048),
    )
}

#: Bytes per element of the stored tensors for each benchmarked precision (TF32 runs on fp32 tensors). For fp8 it
#: is the routed experts' weights (E4M3 codes; their fp32 128x128 block scales add 1/4096 of a byte per element):
#: its router, shared expert and activations stay bf16, which STORAGE_BYTES says.
ELEMENT_BYTES = {"tf32": 4, "fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
#: Bytes per element of everything but the routed experts' weights (router, shared expert, input and output), as
#: FlashMoE's Roofline.swift counts them: the storage type, bf16 for fp8.
STORAGE_BYTES = {**ELEMENT_BYTES, "fp8": 2}


def layer_flops(spec: PresetSpec, tokens: int) -> int:
    """FLOPs of one layer call: routed experts 2·S·k·H·I·(2|3) + gate 2·S·H·E + shared expert 2·S·H·Is·3."""
    routed = 2 * tokens * spec.top_k * spec.hidden * spec.inter * spec.ffn_mats
    gate = 2 * tokens * spec.hidden * spec.experts
    shared = 2 * tokens * spec.hidden * spec.shared_inter * 3
    return routed + gate + shared


def layer_bytes(spec: PresetSpec, tokens: int, experts_touched: float, element_bytes: int,
                expert_bytes: int | None = None) -> int:
    """Bytes a layer call must move at least once: the weights of the experts it touches, the gate (and the
    fp32 selection bias when there is one), the shared expert, the input activations and the output.
    `expert_bytes` is the routed experts' element size where it differs from `element_bytes` (fp8: 1 and 2)."""
    expert = spec.ffn_mats * spec.hidden * spec.inter * (element_bytes if expert_bytes is None else expert_bytes)
    gate = spec.experts * spec.hidden * element_bytes + (spec.experts * 4 if spec.router == "deepseek" else 0)
    shared = 3 * spec.hidden * spec.shared_inter * element_bytes
    activations = 2 * tokens * spec.hidden * element_bytes
    return int(round(experts_touched * expert)) + gate + shared + activations


def expected_experts_touched(spec: PresetSpec, tokens: int) -> float:
    """Experts touched under uniform routing (each token picks k distinct experts): E·(1 − (1 − k/E)^S)."""
    return spec.experts * (1.0 - (1.0 - spec.top_k / spec.experts) ** tokens)


def floor_ms(flops: float, nbytes: float, matmul_tflops: float, copy_gbps: float) -> float:
    """The roofline floor in milliseconds: max(FLOPs / matmul rate, bytes / copy bandwidth)."""
    if matmul_tflops <= 0 or copy_gbps <= 0:
        raise ValueError(f"rates must be positive, got {matmul_tflops} TFLOP/s and {copy_gbps} GB/s")
    return max(flops / (matmul_tflops * 1e12), nbytes / (copy_gbps * 1e9)) * 1e3


def parse_list(text: str, allowed: list[str] | tuple[str, ...], what: str) -> list[str]:
    """Splits a comma list, keeps order, drops repeats; raises ValueError naming the valid choices."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"--{what} is empty: give one or more of {', '.join(allowed)}")
    bad = [t for t in items if t not in allowed]
    if bad:
        raise ValueError(f"unknown {what} {', '.join(bad)}: choose from {', '.join(allowed)}")
    return list(dict.fromkeys(items))


def parse_tokens(text: str, option: str = "--tokens") -> list[int]:
    """Parses `--tokens 4096` or `--tokens 4096,64` (or another `option`'s list) into positive integers."""
    out = []
    for t in (t.strip() for t in text.split(",")):
        if not t:
            continue
        try:
            n = int(t)
        except ValueError:
            raise ValueError(f"{option} takes positive integers separated by commas, got '{t}'") from None
        if n <= 0:
            raise ValueError(f"{option} must be positive, got {n}")
        out.append(n)
    if not out:
        raise ValueError(f"{option} is empty: give e.g. {option} 4096 or {option} 4096,64")
    return list(dict.fromkeys(out))


def check_timing_args(parser, args) -> None:
    """Rejects `--repeats` < 1 and `--warmup` < 0 through `parser.error` (which exits with status 2)."""
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")


def check_torch_run_args(parser, args) -> None:
    """check_timing_args plus what the torch scripts share: `--input-sets` and `--check-tokens` >= 1, and an
    existing folder for `--json`."""
    check_timing_args(parser, args)
    for name in ("input_sets", "check_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.json is not None:
        parent = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(parent):
            parser.error(f"--json: folder {parent} does not exist")


# ---------------------------------------------------------------------------------------------------------------
# Reference routers: one token at a time, float64, ties to the lower index (RouterConfig.swift's rules).


def _top_indices(scores: list[float], k: int) -> list[int]:
    """Indices of the k largest scores; on equal scores the lower index wins."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]


def reference_softmax_topk(
    logits: list[float], k: int, renormalize: bool = True,
) -> tuple[list[int], list[float], list[float]]:
    """Softmax over all experts, the k largest probabilities, optionally divided by their sum.

    Returns (ids, weights, selection scores); the scores are the probabilities the choice was made on."""
    if not 1 <= k <= len(logits):
        raise ValueError(f"top-k must be in 1...{len(logits)}, got {k}")
    m = max(logits)
    ex = [math.exp(v - m) for v in logits]
    total = sum(ex)
    probs = [v / total for v in ex]
    ids = _top_indices(probs, k)
    w = [probs[i] for i in ids]
    if renormalize:
        s = sum(w)
        w = [v / s for v in w]
    return ids, w, probs


def reference_deepseek_route(
    logits: list[float], bias: list[float], k: int, groups: int, groups_kept: int, scaling: float,
    renormalize: bool = True,
) -> tuple[list[int], list[float], list[float]]:
    """DeepSeek-V3's router for one token, as transformers' `DeepseekV3TopkRouter` + `route_tokens_to_experts`:
    s = sigmoid(logits); a group's score is the sum of its two best s + bias; keep the `groups_kept` best groups;
    experts of the other groups get choice score 0.0 (not −∞); choose the k best s + bias; the weights are the
    unbiased s, divided by (their sum + 1e-20), times `scaling`.

    Returns (ids, weights, selection scores); the scores are the masked biased ones the choice was made on."""
    e = len(logits)
    if len(bias) != e:
        raise ValueError(f"bias has {len(bias)} entries for {e} experts")
    if groups < 1 or e % groups != 0:
        raise ValueError(f"{e} experts do not split into {groups} groups")
    per = e // groups
    if per < 2:
        raise ValueError(f"group-limited routing needs >= 2 experts per group, got {per}")
    if not 1 <= groups_kept <= groups:
        raise ValueError(f"groups kept must be in 1...{groups}, got {groups_kept}")
    if not 1 <= k <= groups_kept * per:
        raise ValueError(f"top-k must be in 1...{groups_kept * per} (experts of the kept groups), got {k}")
    s = [1.0 / (1.0 + math.exp(-v)) for v in logits]
    choice = [s[i] + bias[i] for i in range(e)]
    group_scores = []
    for g in range(groups):
        best_two = sorted(choice[g * per:(g + 1) * per], reverse=True)[:2]
        group_scores.append(best_two[0] + best_two[1])
    kept = set(_top_indices(group_scores, groups_kept))
    masked = [choice[i] if (i // per) in kept else 0.0 for i in range(e)]
    ids = _top_indices(masked, k)
    w = [s[i] for i in ids]
    if renormalize:
        total = sum(w) + 1e-20
        w = [v / total for v in w]
    return ids, [v * scaling for v in w], masked


def compare_routes(
    got_ids: list[int], got_w: list[float], ref_ids: list[int], ref_w: list[float], ref_scores: list[float],
    tie_tol: float = 1e-5,
) -> tuple[bool, bool, float]:
    """Compares one token's routing with the reference, ignoring slot order.

    Returns (ids_match, near_tie, max_abs_weight_error). When the chosen sets differ, `near_tie` says whether every
    expert in the symmetric difference scores within `tie_tol` of the weakest reference choice, i.e. the
    difference is fp32-vs-float64 rounding on a near tie rather than a wrong rule. The weight error is measured
    on the experts both chose."""
    got = dict(zip(got_ids, got_w))
    ref = dict(zip(ref_ids, ref_w))
    same = set(got) == set(ref)
    near_tie = False
    if not same:
        threshold = min(ref_scores[i] for i in ref_ids)
        diff = set(got) ^ set(ref)
        near_tie = all(abs(ref_scores[i] - threshold) <= tie_tol * max(1.0, abs(threshold)) for i in diff)
    common = set(got) & set(ref)
    err = max((abs(got[i] - ref[i]) for i in common), default=0.0)
    return same, near_tie, err


# ---------------------------------------------------------------------------------------------------------------
# Output.


def markdown_table(headers: list[str], rows: list[list[str]], align_right: set[int] | None = None) -> str:
    """A GitHub markdown table; columns in `align_right` (by index) are right-aligned."""
    align_right = align_right or set()
    sep = ["---:" if i in align_right else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(sep) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    """A fixed-width plain-text table for terminals (numbers right-aligned by padding on the left)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    fmt = "  ".join("{:>" + str(w) + "}" for w in widths)
    out = [fmt.format(*headers), "  ".join("-" * w for w in widths)]
    out += [fmt.format(*r) for r in rows]
    return "\n".join(out)


def fmt_ms(v: float | None) -> str:
    """Milliseconds with 3 significant decimals, or an en dash when absent."""
    if v is None:
        return "–"
    return f"{v:.3f}" if v < 10 else f"{v:.2f}"
