"""Compressed mixture-of-experts: `SWSCExperts`, transformers' fused expert weights as one `SWSCLinear` per expert.

transformers 5 stores the experts of an MoE block as 3-D parameters of one module (`gate_up_proj` /`up_proj` and
`down_proj`, (experts, out, in), or (experts, in, out) where the class says `is_transposed`), decorated by
`use_experts_implementation`, and the block calls it as `experts(hidden_states, top_k_index, top_k_weights)`.
`SWSCExperts` takes its place with the same call: every expert's matrix is an `SWSCLinear` with its own `LayerSpec`
(`<experts>.compressed.<projection>.<expert>`), and the forward runs the routing transformers' eager path runs:
only the experts some token was routed to are touched, each on its own tokens. Gating (`_apply_gate`, e.g.
gpt-oss's clamped SwiGLU), activation, expert biases and a post-expert norm come from the original module, which
is kept, without its weights, as a template (and restored by `dense_experts` when dequantizing).

Calibration: `expert_gram_hook` accumulates, per expert, X^T X of the tokens routed to it (and of its
down-projection's inputs); experts that received fewer than `MIN_EXPERT_TOKENS` tokens are compressed data-free.

May import `core` and `modules`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .core.spec import LayerSpec
from .modules import SWSCLinear

PROJECTIONS = ("gate_up_proj", "up_proj", "down_proj")
MIN_EXPERT_TOKENS = 16
COMPRESSED = "compressed"


def is_fused_experts(module: nn.Module) -> bool:
    """Whether `module` is a transformers experts module with fused 3-D weights (`use_experts_implementation`)."""
    return (not isinstance(module, SWSCExperts) and hasattr(module, "has_gate") and hasattr(module, "is_transposed")
            and bool(expert_projections(module)))


def expert_projections(module: nn.Module) -> list[str]:
    """The names of the module's 3-D expert weights, in forward order."""
    return [name for name in PROJECTIONS
            if isinstance(module._parameters.get(name), torch.Tensor) and module._parameters[name].dim() == 3]


def expert_shape(module: nn.Module, projection: str) -> tuple[int, int]:
    """(out_features, in_features) of one expert's matrix of `projection`."""
    _, rows, cols = module._parameters[projection].shape
    return (cols, rows) if module.is_transposed else (rows, cols)


def expert_matrix(stacked: torch.Tensor, index: int, transposed: bool) -> torch.Tensor:
    """Expert `index`'s (out, in) matrix from a stacked 3-D weight."""
    return stacked[index].t() if transposed else stacked[index]


def expert_layer_name(experts_name: str, projection: str, index: int) -> str:
    """The module name of one expert's compressed matrix (the key of its layout in `compressed_layers`)."""
    return f"{experts_name}.{COMPRESSED}.{projection}.{index}"


class SWSCExperts(nn.Module):
    """The experts of an MoE block, each expert's matrices an `SWSCLinear`; called like the module it replaces."""

    def __init__(self, original: nn.Module, specs: dict[str, list[LayerSpec]], *, dtype: torch.dtype,
                 dense_dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_experts = original.num_experts
        self.projections = list(specs)
        self.has_gate = original.has_gate
        self.has_bias = getattr(original, "has_bias", False)
        self.is_transposed = original.is_transposed
        self.has_post_expert_norm = getattr(original, "has_post_expert_norm", False)
        self.dense_dtype = dense_dtype
        self.compressed = nn.ModuleDict({
            projection: nn.ModuleList(SWSCLinear(spec, dtype=dtype, device=device, bias_dtype=dense_dtype)
                                      for spec in layer_specs)
            for projection, layer_specs in specs.items()
        })
        for name, child in original.named_children():  # act_fn, post_expert_norm: kept as they are
            self.add_module(name, child)
        for name, param in original.named_parameters(recurse=False):
            if name not in PROJECTIONS:  # expert biases stay dense, under their own names
                self.register_parameter(name, param)
        template = original
        for name in expert_projections(original):
            param = original._parameters[name]
            template._parameters[name] = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device="meta"),
                                                      requires_grad=False)
        self.__dict__["template"] = template  # not a child: not saved, not moved, no weights

    def layers(self, projection: str) -> nn.ModuleList:
        return self.compressed[projection]

    def _project(self, projection: str, index: int, x: torch.Tensor) -> torch.Tensor:
        out = self.compressed[projection][index](x)
        bias = getattr(self, f"{projection}_bias", None)
        return out if bias is None else out + bias[index].to(out.dtype)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()
        first = "gate_up_proj" if self.has_gate else "up_proj"
        for index in hit:
            if index >= self.num_experts:  # expert-parallel sentinel
                continue
            position, tokens = torch.where(mask[index])
            hidden = self._project(first, index, hidden_states[tokens])
            hidden = self.template._apply_gate(hidden) if self.has_gate else self.act_fn(hidden)
            hidden = self._project("down_proj", index, hidden)
            if self.has_post_expert_norm:
                hidden = self.post_expert_norm(hidden)
            hidden = hidden * top_k_weights[tokens, position, None]
            final.index_add_(0, tokens, hidden.to(final.dtype))
        return final

    @torch.no_grad()
    def dense_experts(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The original experts module again, with every expert's dense weight (for dequantizing)."""
        module = self.template
        for projection in self.projections:
            stacked = torch.stack([layer.dequantize() for layer in self.compressed[projection]])
            if self.is_transposed:
                stacked = stacked.transpose(1, 2)
            module._parameters[projection] = nn.Parameter(stacked.to(dtype or self.dense_dtype).contiguous(),
                                                          requires_grad=False)
        for name, child in self.named_children():
            if name != COMPRESSED:
                setattr(module, name, child)
        for name, param in self.named_parameters(recurse=False):
            module._parameters[name] = param
        return module


def expert_gram_hook(module: nn.Module, grams: dict[str, torch.Tensor], counts: dict[str, int], prefix: str):
    """A forward hook on a dense fused-experts module that adds, for every expert, X^T X of the tokens routed to it
    (and of its down-projection's inputs) to `grams` under the expert layers' names, and their count to `counts`."""

    def add(name: str, x: torch.Tensor) -> None:
        x = x.detach().float()
        gram = x.t() @ x
        grams[name] = grams[name] + gram if name in grams else gram
        counts[name] = counts.get(name, 0) + x.shape[0]

    @torch.no_grad()
    def hook(_module, args, kwargs, _output):
        hidden_states, top_k_index = (list(args) + [kwargs.get("top_k_index")])[:2]
        hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1])
        first = "gate_up_proj" if module.has_gate else "up_proj"
        for index in torch.unique(top_k_index).tolist():
            if index >= module.num_experts:
                continue
            tokens = torch.where((top_k_index == index).any(dim=-1))[0]
            x = hidden_states[tokens]
            add(expert_layer_name(prefix, first, index), x)
            weight = expert_matrix(module._parameters[first], index, module.is_transposed)
            hidden = F.linear(x, weight.to(x.dtype))
            bias = getattr(module, f"{first}_bias", None)
            if bias is not None:
                hidden = hidden + bias[index].to(hidden.dtype)
            hidden = module._apply_gate(hidden) if module.has_gate else module.act_fn(hidden)
            add(expert_layer_name(prefix, "down_proj", index), hidden)

    return hook
