"""LoRA on compressed models: `SWSCLinear` layers wrapped by PEFT, merged exactly into the low-rank term.

LoRA: `register_with_peft()` (called by `import swsc_hf`) puts a dispatcher in front of PEFT's default one, so a
plain `get_peft_model(model, LoraConfig(target_modules=[...]))` wraps compressed layers in `SWSCLoraLinear`, and
`PeftModel.from_pretrained(base, adapter_path)` finds them too (PEFT's per-config `_register_custom_module` is not
saved with the adapter, a dispatcher needs no config). The compressed tables stay frozen and compressed; the
forward is PEFT's: base(x) + lora_B(lora_A(dropout(x))) * scaling. Only LoRA has such a hook in PEFT: IA3, OFT,
VeRA, ... reject layers that are not nn.Linear. `register_with_peft` also makes `target_modules="all-linear"`
include the compressed layers, and `peft.prepare_model_for_kbit_training` run `prepare_for_training` on an swsc_hf
model (instead of upcasting its tables).

Merging: PEFT's `merge_and_unload()` merges exactly into the compressed low-rank term
(lowrank_a' = [lowrank_a | s * lora_B], lowrank_b' = [lowrank_b; lora_A]: the rank grows by r); `merge_and_unload`
here also records the new ranks in the config so the result saves and reloads, or merges to a plain dense model.

Centroid (table) fine-tuning lives in `table_training`. May import `modules`, `model_ops`, `table_training` and
PEFT (optional).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import nn

from .model_ops import dense_linear, dequantize_model, record_layouts, swap_module
from .modules import SWSCLinear
from .table_training import finish_training, is_peft_model, model_dtype, prepare_for_training, swsc_config

logger = logging.getLogger(__name__)

MERGE_MODES = ("compressed", "dense")
# Initialisations that only touch the LoRA factors; the others (PiSSA, OLoRA, LoftQ, ...) rewrite `base_layer.weight`.
SUPPORTED_INITS = (True, False, "gaussian")

try:  # PEFT is optional: without it (or with one too old to have these names) LoRA support is just off
    from peft.tuners.lora.config import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge

    PEFT_AVAILABLE = True
except ImportError:
    PEFT_AVAILABLE = False

if PEFT_AVAILABLE:

    class SWSCLoraLinear(PeftLoraLinear):
        """LoRA adapters on a compressed `SWSCLinear`: y = base(x) + lora_B(lora_A(dropout(x))) * scaling.

        The compressed base is never densified: the forward runs the base layer as is, and `merge` appends the
        adapter to the base's low-rank term (exact, and undone exactly by `unmerge`). DoRA and the initialisations
        that rewrite the base weight need a dense weight and are refused.
        """

        def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs: Any) -> None:
            _check_supported(config)
            super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

        @property
        def lora_variants(self) -> dict:
            return {(): None}  # vanilla LoRA only: the variants (DoRA, ...) read or rewrite `base_layer.weight`

        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
            return module.in_features, module.out_features

        def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[torch.device, None]:
            """Adapters go to the base layer's device and keep their own (float32) dtype: the base has no `weight`."""
            tensor = next(iter(base_layer.parameters()), None)
            if tensor is None:
                tensor = next(iter(base_layer.buffers()))
            return tensor.device, None

        @torch.no_grad()
        def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
            """Append each adapter to the compressed low-rank term (rank += r); exact, no dense weight is built."""
            base = self.get_base_layer()
            for name in check_adapters_to_merge(self, adapter_names):
                if name not in self.lora_A:
                    continue
                factor_a = self.lora_B[name].weight * self.scaling[name]  # (out, r)
                factor_b = self.lora_A[name].weight  # (r, in)
                if safe_merge and not (torch.isfinite(factor_a).all() and torch.isfinite(factor_b).all()):
                    raise ValueError(f"NaNs detected in the adapter {name!r}; it seems to be broken")
                _append_low_rank(base, factor_a, factor_b)
                if self.lora_bias[name]:
                    base.bias.data += (self.lora_B[name].bias * self.scaling[name]).to(base.bias.dtype)
                self.merged_adapters.append(name)

        @torch.no_grad()
        def unmerge(self) -> None:
            """Take merged adapters out of the low-rank term again (drops the columns/rows `merge` appended)."""
            if not self.merged:
                logger.warning("SWSCLoraLinear.unmerge: nothing is merged")
                return
            base = self.get_base_layer()
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                if name not in self.lora_A:
                    continue
                _drop_low_rank(base, self.r[name])
                if self.lora_bias[name]:
                    base.bias.data -= (self.lora_B[name].bias * self.scaling[name]).to(base.bias.dtype)

        @torch.no_grad()
        def dense_merged(self, dtype: torch.dtype, adapter_names: list[str] | None = None) -> nn.Linear:
            """An nn.Linear holding the base's dense weight plus the adapters (all active ones by default)."""
            base = self.get_base_layer()
            if self.merged:
                self.unmerge()
            weight = base.dequantize().float()
            bias = base.bias.detach().float().clone() if base.bias is not None else None
            for name in adapter_names or self.active_adapters:
                if name not in self.lora_A:
                    continue
                weight += self.get_delta_weight(name).float().to(weight.device)
                if self.lora_bias[name]:
                    if bias is None:
                        raise RuntimeError(f"cannot merge adapter {name!r} with lora_bias=True: the layer has no bias")
                    bias += (self.lora_B[name].bias * self.scaling[name]).float().to(bias.device)
            return dense_linear(weight, bias, dtype).requires_grad_(False)

    def _dispatch_swsc(target: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any) -> nn.Module | None:
        """PEFT dispatcher: SWSCLoraLinear for an SWSCLinear target, None (not ours) otherwise."""
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, SWSCLinear):
            return SWSCLoraLinear(target, adapter_name, config=config, **kwargs)
        return None


def _check_supported(config: Any) -> None:
    """Refuse the LoRA options that need the dense base weight, with what to do instead."""
    if config.use_dora:
        raise ValueError(
            "DoRA (use_dora=True) is not supported on swsc_hf compressed layers: it needs the column norms of the "
            "dense weight, which SWSCLinear never builds. Use plain LoRA (use_dora=False), or densify the model "
            "first with model.dequantize()."
        )
    if config.init_lora_weights not in SUPPORTED_INITS:
        raise ValueError(
            f"init_lora_weights={config.init_lora_weights!r} is not supported on swsc_hf compressed layers: it reads "
            f"or rewrites the dense base weight. Use one of {SUPPORTED_INITS}."
        )
    if config.fan_in_fan_out:
        raise ValueError("fan_in_fan_out=True is for GPT-2 style Conv1D weights; SWSCLinear is (out, in) like "
                         "nn.Linear: set fan_in_fan_out=False")


def register_with_peft() -> bool:
    """Make PEFT's LoRA wrap every `SWSCLinear` in `SWSCLoraLinear`, for any LoraConfig (new or loaded from disk).

    Puts `_dispatch_swsc` in front of `peft.tuners.lora.model.dispatch_default`, the last dispatcher
    `LoraModel._create_new_module` tries (it looks the name up at call time). Idempotent; returns False (and does
    nothing) when PEFT is not installed.
    """
    if not PEFT_AVAILABLE:
        return False
    import peft.tuners.lora.model as lora_model

    default = lora_model.dispatch_default
    if getattr(default, "swsc_hf", False):
        return True

    def dispatch_swsc_or_default(target: nn.Module, adapter_name: str, config: Any, **kwargs: Any) -> nn.Module | None:
        new_module = _dispatch_swsc(target, adapter_name, config, **kwargs)
        return new_module if new_module is not None else default(target, adapter_name, config=config, **kwargs)

    dispatch_swsc_or_default.swsc_hf = True
    lora_model.dispatch_default = dispatch_swsc_or_default
    _patch_all_linear()
    _patch_prepare_model_for_kbit_training()
    return True


def _patch_all_linear() -> None:
    """`target_modules="all-linear"` collects only nn.Linear/Conv1D (the compressed layers are neither): PEFT's
    helper (looked up at call time by `BaseTuner.inject_adapter`) is wrapped to add every `SWSCLinear` too, the
    output embedding excepted, as it does for linears."""
    import peft.tuners.tuners_utils as tuners_utils

    original = tuners_utils._maybe_include_all_linear_layers
    if getattr(original, "swsc_hf", False):
        return

    def include_compressed_layers(peft_config: Any, model: nn.Module) -> Any:
        target = getattr(peft_config, "target_modules", None)
        wanted = isinstance(target, str) and target.lower() == "all-linear"
        peft_config = original(peft_config, model)
        if wanted:
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            compressed = {name for name, m in model.named_modules() if isinstance(m, SWSCLinear) and m is not head}
            peft_config.target_modules = set(peft_config.target_modules or ()) | compressed
        return peft_config

    include_compressed_layers.swsc_hf = True
    tuners_utils._maybe_include_all_linear_layers = include_compressed_layers


def _patch_prepare_model_for_kbit_training() -> None:
    """`peft.prepare_model_for_kbit_training` does not know quant_method "swsc": it would cast the compressed float16
    tables to float32 (double their memory) and enable neither activation checkpointing nor input gradients. On an
    swsc_hf model the wrapper runs `prepare_for_training` instead (what PEFT does for the methods it knows, tables
    kept in their stored dtype) and says so; other models go to PEFT's own. Names bound before `import swsc_hf`
    (`from peft import prepare_model_for_kbit_training` earlier) keep PEFT's function."""
    import peft
    import peft.utils
    import peft.utils.other

    original = peft.utils.other.prepare_model_for_kbit_training
    if getattr(original, "swsc_hf", False):
        return

    def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                        *args: Any, **kwargs: Any) -> nn.Module:
        if getattr(getattr(model.config, "quantization_config", None), "quant_method", None) != "swsc":
            return original(model, use_gradient_checkpointing, *args, **kwargs)
        logger.warning("peft.prepare_model_for_kbit_training on an swsc_hf model runs "
                       "swsc_hf.prepare_for_training: compressed tables keep their stored dtype")
        return prepare_for_training(model, gradient_checkpointing=use_gradient_checkpointing)

    prepare_model_for_kbit_training.swsc_hf = True
    prepare_model_for_kbit_training.__doc__ = original.__doc__
    for module in (peft, peft.utils, peft.utils.other):
        if getattr(module, "prepare_model_for_kbit_training", None) is original:
            module.prepare_model_for_kbit_training = prepare_model_for_kbit_training


# ---- low-rank term surgery (merge / unmerge) ---------------------------------------------------------------------
def _table_dtype(layer: SWSCLinear) -> torch.dtype:
    """The dtype of the layer's stored float tables (its low-rank factor's, else its scales' or codebook's)."""
    tables = (getattr(layer, name, None) for name in ("lowrank_a", "scales", "codebook"))
    return next(table.dtype for table in tables if table is not None)


def _set_frozen(layer: nn.Module, name: str, tensor: torch.Tensor) -> None:
    setattr(layer, name, nn.Parameter(tensor.contiguous(), requires_grad=False))


def _merge_blocker(layer: SWSCLinear, extra_rank: int) -> str | None:
    """Why `extra_rank` more rank cannot be merged exactly into the layer's low-rank term; None when it can."""
    spec = layer.spec
    if spec.shared_basis is not None:
        return (f"the layer shares its input-side basis {spec.shared_basis!r} with other layers (Basis Sharing), so "
                "an adapter cannot be merged into it exactly without changing those layers; merge to dense instead: "
                'swsc_hf.lora.merge_and_unload(model, mode="dense")')
    limit = min(spec.out_features, spec.in_features)
    if spec.rank + extra_rank > limit:
        return (f"merging would raise the layer's rank to {spec.rank + extra_rank}, above min(out, in) = {limit}; "
                'merge to dense instead: swsc_hf.lora.merge_and_unload(model, mode="dense")')
    return None


def _append_low_rank(layer: SWSCLinear, factor_a: torch.Tensor, factor_b: torch.Tensor) -> None:
    """lowrank_a <- [lowrank_a | factor_a], lowrank_b <- [lowrank_b; factor_b]; the spec's rank grows to match."""
    reason = _merge_blocker(layer, factor_a.shape[1])
    if reason is not None:
        raise ValueError(reason)
    spec = layer.spec
    rank = spec.rank + factor_a.shape[1]
    dtype = _table_dtype(layer)
    device = layer.codes.device if spec.n_clusters else layer.lowrank_a.device
    factor_a, factor_b = factor_a.to(device, dtype), factor_b.to(device, dtype)
    if spec.rank:
        factor_a = torch.cat([layer.lowrank_a, factor_a], dim=1)
        factor_b = torch.cat([layer.lowrank_b, factor_b], dim=0)
    _set_frozen(layer, "lowrank_a", factor_a)
    _set_frozen(layer, "lowrank_b", factor_b)
    layer.spec = dataclasses.replace(spec, rank=rank)


def _drop_low_rank(layer: SWSCLinear, r: int) -> None:
    """Undo `_append_low_rank` of an r-rank factor pair: drop the last r columns of lowrank_a and rows of lowrank_b."""
    rank = layer.spec.rank - r
    if rank:
        _set_frozen(layer, "lowrank_a", layer.lowrank_a[:, :rank].clone())
        _set_frozen(layer, "lowrank_b", layer.lowrank_b[:rank].clone())
    else:
        del layer.lowrank_a, layer.lowrank_b
    layer.spec = dataclasses.replace(layer.spec, rank=rank)


def sync_compressed_layers(model: nn.Module) -> None:
    """Rewrite `quantization_config.compressed_layers` from the model's SWSCLinear layers (see `record_layouts`)."""
    record_layouts(model, swsc_config(model))


def merge_and_unload(
    model: nn.Module, mode: str = "compressed", safe_merge: bool = False, adapter_names: list[str] | None = None
) -> nn.Module:
    """Merge a PEFT LoRA model on a compressed base and return the plain transformers model, ready to save.

    mode="compressed": exact merge into each layer's low-rank term (rank += r), tables stored back in the
    checkpoint's table dtype (`finish_training`), and the new layouts recorded in the config, so
    save_pretrained -> from_pretrained reproduces the merged model. Fails for layers with a shared basis.
    mode="dense": every layer becomes an nn.Linear (adapters merged into the dequantized weights) and the
    quantization config is removed: the result is an ordinary dense model.
    """
    if mode not in MERGE_MODES:
        raise ValueError(f"merge_and_unload(mode={mode!r}): use one of {MERGE_MODES}")
    if not is_peft_model(model):
        raise ValueError("merge_and_unload expects a PEFT model (from get_peft_model or PeftModel.from_pretrained)")
    base = model.get_base_model()
    swsc_config(base)
    if mode == "compressed":
        for name, module in base.named_modules():  # check every layer first, so a refusal leaves the model as it was
            if isinstance(module, SWSCLoraLinear):
                pending = [a for a in check_adapters_to_merge(module, adapter_names) if a in module.lora_A]
                reason = _merge_blocker(module.get_base_layer(), sum(module.r[a] for a in pending))
                if reason is not None:
                    raise ValueError(f"cannot merge into {name}: {reason}")
        merged = model.merge_and_unload(safe_merge=safe_merge, adapter_names=adapter_names)
        finish_training(merged)
        sync_compressed_layers(merged)
        return merged
    dtype = model_dtype(base)
    for name, module in list(base.named_modules()):
        if isinstance(module, SWSCLoraLinear):
            swap_module(base, name, module.dense_merged(dtype, adapter_names))
    merged = model.merge_and_unload(safe_merge=safe_merge, adapter_names=adapter_names)  # other LoRA layers
    dequantize_model(merged, dtype=dtype)
    quantizer = getattr(merged, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(merged)
    elif hasattr(merged.config, "quantization_config"):
        del merged.config.quantization_config
    merged.is_quantized = False
    return merged
