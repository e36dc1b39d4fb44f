"""transformers support: what a family's MoE block computes (`describe_block`) and `patch` / `unpatch`.

The families (keyed by `config.model_type`, as `FAMILIES` lists them):

| model_type  | block class                         | router                                    | shared expert          |
|-------------|-------------------------------------|-------------------------------------------|------------------------|
| mixtral     | MixtralSparseMoeBlock               | softmax top-k, renormalised               | -                      |
| qwen2_moe   | Qwen2MoeSparseMoeBlock              | softmax top-k, renormalised if norm_topk_prob | shared_expert, sigmoid-gated by shared_expert_gate |
| qwen3_moe   | Qwen3MoeSparseMoeBlock              | softmax top-k, renormalised if norm_topk_prob | -                  |
| deepseek_v3 | DeepseekV3MoE                       | sigmoid, group-limited, e_score_correction_bias, renormalised if norm_topk_prob, × routed_scaling_factor | shared_experts |

Experts: transformers 5 holds them fused (`experts.gate_up_proj` [E, 2I, H], rows 0..I-1 the gate, and
`experts.down_proj` [E, H, I]), which FlashMoE takes as they are (FLASHMOE_LAYOUT_FUSED); transformers 4 holds one
module per expert (w1/w3/w2 for Mixtral, gate_proj/up_proj/down_proj otherwise), stacked here into temporaries
(FLASHMOE_LAYOUT_SEPARATE) that live only until the library has copied them.

FP8 models (transformers' fine-grained FP8, as DeepSeek-V3 and the Qwen3 FP8 releases load): fused float8_e4m3fn
experts with `gate_up_proj_scale_inv` and `down_proj_scale_inv` (128x128 blocks) pass as they are, with those scales,
and make the layer precision fp8; per-expert FP8 linears (`weight` and `weight_scale_inv`) are stacked the same way.
The shared expert of an FP8 model is dequantized to bfloat16 (FlashMoE runs the shared expert in bf16).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .config import MoEConfig

logger = logging.getLogger("flashmoe")


@dataclass(frozen=True)
class Family:
    """One supported model family: its MoE block class names (transformers 5 and 4) and how its router works."""

    model_type: str
    block_classes: tuple[str, ...]
    #: per-expert module names in transformers 4 (gate, up, down)
    expert_names: tuple[str, str, str]
    sigmoid_router: bool = False
    #: the router always renormalises (Mixtral), else config.norm_topk_prob decides
    always_renormalize: bool = False


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("mixtral", ("MixtralSparseMoeBlock",), ("w1", "w3", "w2"), always_renormalize=True),
        Family("qwen2_moe", ("Qwen2MoeSparseMoeBlock",), ("gate_proj", "up_proj", "down_proj")),
        Family("qwen3_moe", ("Qwen3MoeSparseMoeBlock",), ("gate_proj", "up_proj", "down_proj")),
        Family("deepseek_v3", ("DeepseekV3MoE",), ("gate_proj", "up_proj", "down_proj"), sigmoid_router=True),
    )
}
_FAMILY_OF_CLASS = {name: f for f in FAMILIES.values() for name in f.block_classes}


def family_of_block(block: torch.nn.Module) -> Family:
    """The family whose MoE block `block` is; ValueError naming the supported classes otherwise."""
    family = _FAMILY_OF_CLASS.get(type(block).__name__)
    if family is None:
        raise ValueError(f"block: {type(block).__name__} is not a supported MoE block; supported: "
                         f"{sorted(_FAMILY_OF_CLASS)}")
    return family


def _model_config_of(block: torch.nn.Module):
    for owner in (block, getattr(block, "experts", None), getattr(block, "gate", None)):
        config = getattr(owner, "config", None)
        if config is not None and hasattr(config, "num_experts_per_tok"):
            return config
    raise ValueError(f"config: {type(block).__name__} carries no model config; pass the model's config "
                     f"(MoELayer.from_hf_block(block, model.config))")


def _stack(experts, name: str, attribute: str = "weight") -> torch.Tensor:
    return torch.stack([getattr(getattr(e, name), attribute) for e in experts])


_BLOCK = 128  # the FP8 block edge FlashMoE takes (docs/fp8.md)
#: Where transformers' FP8 modules keep their block scales: fused experts, and one linear's.
_SCALE_ATTRIBUTES = ("gate_up_proj_scale_inv", "down_proj_scale_inv", "weight_scale_inv")


def _check_block_size(owner, where: str) -> None:
    """Refuses FP8 scales of blocks other than 128x128, naming the module."""
    block = getattr(owner, "block_size", None)
    if block is not None and tuple(block) != (_BLOCK, _BLOCK):
        raise ValueError(f"{where}.block_size is {tuple(block)}: FlashMoE's fp8 takes 128x128 block scales only")


def _fp8_expert_scales(experts, fused: bool, names: tuple[str, str, str]) -> dict[str, torch.Tensor]:
    """The routed experts' FP8 block scales under FlashMoE's names ({} for experts that are not FP8)."""
    if fused:
        gate_up = getattr(experts, "gate_up_proj_scale_inv", None)
        down = getattr(experts, "down_proj_scale_inv", None)
        if gate_up is None and down is None:
            return {}
        if gate_up is None or down is None:
            raise ValueError("block.experts has only one of gate_up_proj_scale_inv and down_proj_scale_inv")
        _check_block_size(experts, "block.experts")
        return {"gate_up_scale": gate_up, "down_scale": down}
    if getattr(getattr(experts[0], names[0]), "weight_scale_inv", None) is None:
        return {}
    _check_block_size(getattr(experts[0], names[0]), f"block.experts[0].{names[0]}")
    g, u, d = names
    return {"gate_scale": _stack(experts, g, "weight_scale_inv"), "up_scale": _stack(experts, u, "weight_scale_inv"),
            "down_scale": _stack(experts, d, "weight_scale_inv")}


def _dense(linear: torch.nn.Module) -> torch.Tensor:
    """A linear's weight; an FP8 linear's (float8_e4m3fn `weight`, `weight_scale_inv` per 128x128 block)
    dequantized to bfloat16."""
    w = linear.weight
    scale = getattr(linear, "weight_scale_inv", None)
    if w.dtype != torch.float8_e4m3fn or scale is None:
        return w
    _check_block_size(linear, "the shared expert's linear")
    r, c = w.shape
    s = scale.float().repeat_interleave(_BLOCK, 0)[:r].repeat_interleave(_BLOCK, 1)[:, :c]
    return (w.float() * s).to(torch.bfloat16)


def describe_block(block: torch.nn.Module, config=None, **options):
    """(MoEConfig, WeightSource) for a transformers MoE block: the config from the model config and the weights'
    shapes, the weights read from the block's parameters each time the native layer is (re)built."""
    from .torch_layer import WeightSource

    family = family_of_block(block)
    config = config if config is not None else _model_config_of(block)
    gate = block.gate
    experts = block.experts
    fused = hasattr(experts, "gate_up_proj")
    e, h = gate.weight.shape
    if fused:
        inter = experts.down_proj.shape[2]
        if tuple(experts.gate_up_proj.shape) != (e, 2 * inter, h):
            raise ValueError(f"block.experts.gate_up_proj has shape {list(experts.gate_up_proj.shape)}, expected "
                             f"[{e}, {2 * inter}, {h}] (concatenated gate and up); interleaved or transposed expert "
                             f"layouts are not supported")
    else:
        inter = getattr(experts[0], family.expert_names[0]).weight.shape[0]
    shared = getattr(block, "shared_expert", None)
    if shared is None:
        shared = getattr(block, "shared_experts", None)
    shared_gate = getattr(block, "shared_expert_gate", None)
    # The router's weight and selection bias are read from the gate each time, like every other weight: a buffer
    # moved by .to()/.cuda() is a new tensor object (parameters keep theirs), so a reference kept here would go stale
    # and, after a device move, sit on the old device.
    bias = lambda: getattr(gate, "e_score_correction_bias", None) if family.sigmoid_router else None  # noqa: E731

    fields = dict(hidden=h, intermediate=inter, experts=e, top_k=int(config.num_experts_per_tok), ffn="gated",
                  activation=config.hidden_act)
    if family.sigmoid_router:
        fields.update(router="sigmoid", renormalize=bool(config.norm_topk_prob), groups=int(config.n_group or 1),
                      groups_kept=int(config.topk_group or 1), scaling=float(config.routed_scaling_factor))
    else:
        fields.update(router="softmax",
                      renormalize=True if family.always_renormalize else bool(config.norm_topk_prob))
    if shared is not None:
        fields.update(shared_intermediate=shared.gate_proj.weight.shape[0], shared_gated=shared_gate is not None)
    scales = lambda: _fp8_expert_scales(experts, fused, family.expert_names)  # noqa: E731 - read at each build
    if scales():
        fields.update(precision="fp8")
    fields.update(options)
    moe_config = MoEConfig(**fields)

    def tensors() -> list[torch.Tensor]:
        out = [gate.weight]
        if fused:
            out += [experts.gate_up_proj, experts.down_proj]
        else:
            out += [getattr(x, n).weight for x in experts for n in family.expert_names]
        # The scale parameters themselves (per-expert ones, not their stack): what an edit or a swap changes.
        owners = [experts] if fused else [getattr(x, n) for x in experts for n in family.expert_names]
        out += [t for o in owners for t in (getattr(o, a, None) for a in _SCALE_ATTRIBUTES) if t is not None]
        if bias() is not None:
            out.append(bias())
        if shared is not None:
            linears = (shared.gate_proj, shared.up_proj, shared.down_proj)
            out += [x.weight for x in linears]
            out += [x.weight_scale_inv for x in linears if getattr(x, "weight_scale_inv", None) is not None]
        if shared_gate is not None:
            out.append(shared_gate.weight)
        return out

    def build() -> dict[str, torch.Tensor]:
        w = {"router": gate.weight.detach()}
        if fused:
            w["gate_up"] = experts.gate_up_proj.detach()
            w["down"] = experts.down_proj.detach()
        else:
            g, u, d = family.expert_names
            w["gate"], w["up"], w["down"] = (_stack(experts, g).detach(), _stack(experts, u).detach(),
                                             _stack(experts, d).detach())
        w.update({k: v.detach().float() for k, v in scales().items()})
        if bias() is not None:
            w["selection_bias"] = bias().detach().float()
        if shared is not None:
            sg, su, sd = (_dense(shared.gate_proj), _dense(shared.up_proj), _dense(shared.down_proj))
            if fused:  # one layout for routed and shared experts: the shared gate and up rows concatenated
                w["shared_gate_up"] = torch.cat([sg, su]).detach()
            else:
                w["shared_gate_up"], w["shared_up"] = sg.detach(), su.detach()
            w["shared_down"] = sd.detach()
        if shared_gate is not None:
            w["shared_gate"] = shared_gate.weight.detach().reshape(-1)
        return {k: v.contiguous() for k, v in w.items()}

    return moe_config, WeightSource(tensors, build)


# ---------------------------------------------------------------------------------------------------------------------
# Patching


class FlashMoEBlock(torch.nn.Module):
    """Stands in for a transformers MoE block: the same children under the same names (so the state dict, and a
    checkpoint, are unchanged), the same return convention (a tensor, or (hidden, router_logits) for blocks that
    return that), computed by a `flashmoe.MoELayer` (child `flashmoe`, no state of its own).

    Inputs of any shape [..., H] and any float dtype are accepted as the original block accepts them: rows are made
    contiguous and 16-byte aligned, cast to the layer's storage dtype, and run in chunks of max_tokens."""

    def __init__(self, block: torch.nn.Module, model_config, returns_router_logits: bool, **options):
        super().__init__()
        from .torch_layer import MoELayer

        for name, child in block.named_children():
            self.add_module(name, child)
        for name, param in block.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buf in block.named_buffers(recurse=False):
            self.register_buffer(name, buf, persistent=name not in block._non_persistent_buffers_set)
        for name, value in vars(block).items():  # plain settings the surrounding code may read (top_k, ...)
            if not name.startswith("_") and name != "training" and isinstance(value, (bool, int, float, str)):
                setattr(self, name, value)
        self.__dict__["original"] = block  # kept for unpatch(), not registered (its children are ours already)
        self.returns_router_logits = returns_router_logits
        self.record_router_logits = bool(getattr(model_config, "output_router_logits", False))
        self.flashmoe = MoELayer.from_hf_block(block, model_config, **options)
        self.hidden = self.flashmoe.config.hidden
        self.max_tokens = self.flashmoe.config.max_tokens

    def _apply(self, fn, *args, **kwargs):
        # Every child and this block's own parameters have moved: rebuild the layer if its weights changed (the
        # layer's own _apply ran before this block's parameters moved, and waits for them on a device move).
        out = super()._apply(fn, *args, **kwargs)
        layer = self.flashmoe
        if layer._holder[0] is not None and layer._source_changed():
            layer.refresh()
        return out

    def _router_logits(self, x: torch.Tensor) -> torch.Tensor:
        out = self.gate(x)  # runs transformers' own router (its output recorder sees it too)
        return out[0] if isinstance(out, tuple) else out

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        """The block's output for `hidden_states` [..., H] through the fused layer (in chunks of `max_tokens`);
        (output, router logits) where the replaced block returned its logits. Inference only."""
        if self.training and torch.is_grad_enabled():
            raise RuntimeError("flashmoe blocks are inference-only (no backward): call model.eval() or run under "
                               "torch.no_grad(), or flashmoe.unpatch(model) to train")
        x = hidden_states.reshape(-1, self.hidden)
        layer = self.flashmoe
        storage = layer.storage_dtype
        if x.dtype != storage:
            x = x.to(storage)
        if not torch.compiler.is_compiling() and (not x.is_contiguous() or x.data_ptr() % 16):
            x = x.clone(memory_format=torch.contiguous_format)
        if x.shape[0] <= self.max_tokens:
            y = layer(x)
        else:
            y = torch.cat([layer(c.contiguous()) for c in torch.split(x, self.max_tokens)])
        y = y.to(hidden_states.dtype).view(hidden_states.shape)
        logits = None
        if self.returns_router_logits or self.record_router_logits:
            logits = self._router_logits(hidden_states.reshape(-1, self.hidden))
        return (y, logits) if self.returns_router_logits else y

    def extra_repr(self) -> str:
        """The transformers block this one replaces, shown by `print(model)`."""
        return f"replaces {type(self.original).__name__}"


def _returns_tuple(block: torch.nn.Module, hidden: int) -> bool:
    """Whether `block` returns (hidden, router_logits) (transformers 4) rather than a tensor: one probe token."""
    try:
        param = next(block.parameters())
        if param.device.type == "meta":
            return False
        probe = torch.zeros(1, 1, hidden, dtype=param.dtype, device=param.device)
        with torch.no_grad():
            return isinstance(block(probe), tuple)
    except Exception as e:  # noqa: BLE001 - a probe failure must not stop patching
        logger.debug("flashmoe: could not probe %s (%s); assuming it returns a tensor", type(block).__name__, e)
        return False


def _model_type(model) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def patch(model: torch.nn.Module, **options) -> list[str]:
    """Replaces every MoE block of a transformers model (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3) in place with
    a FlashMoEBlock and returns the replaced modules' names. A model of another `config.model_type` is logged and
    left alone (returns []). Parameter names and values are unchanged. `options` set MoEConfig fields for every
    layer, e.g. `max_tokens=8192` (default 4096: larger inputs run in chunks), `precision="tf32"`."""
    model_type = _model_type(model)
    family = FAMILIES.get(model_type)
    if family is None:
        logger.warning("flashmoe.patch: model_type %r is not supported (supported: %s); the model is left unchanged",
                       model_type, ", ".join(FAMILIES))
        return []
    config = model.config
    targets = [(name, m) for name, m in model.named_modules() if type(m).__name__ in family.block_classes]
    patched = []
    for name, block in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        returns = _returns_tuple(block, block.gate.weight.shape[1])
        setattr(parent, attr, FlashMoEBlock(block, config, returns, **options))
        patched.append(name)
    logger.info("flashmoe.patch: %d %s block(s) replaced", len(patched), family.block_classes[0])
    return patched


def unpatch(model: torch.nn.Module) -> list[str]:
    """Puts the original blocks back (sharing the same parameters) and frees the native layers; returns the names."""
    restored = []
    for name, module in list(model.named_modules()):
        if isinstance(module, FlashMoEBlock):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, module.original)
            module.flashmoe.close()
            restored.append(name)
    return restored
