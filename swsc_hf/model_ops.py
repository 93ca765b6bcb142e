"""Every change swsc_hf makes to a model: which linears it targets, swapping modules, building `SWSCLinear` layers,
the shared-basis holder and its links, recording layouts, marking a model compressed, giving a dense head the dense
GEMV, and dequantizing.

The compression schedule, the load-time hook, LoRA and the CLI change models only through these functions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D
from transformers.quantizers.quantizers_utils import get_module_from_name, should_convert_module

from .atomic_save import install_atomic_save
from .config import SWSCConfig
from .core.compress import CompressedWeight, int8_grid_codebook
from .core.spec import LayerSpec
from .experts import (
    SWSCExperts,
    expert_layer_name,
    expert_matrix,
    expert_projections,
    expert_shape,
    is_fused_experts,
)
from .generation import use_decode_attention, use_sdpa_attention
from .modules import KeepsTableDtype, SWSCDenseLinear, SWSCEmbedding, SWSCLinear
from .rotation import finish_loading, remove_rotation
from .validation import check_finite, validate_codes

logger = logging.getLogger(__name__)

SHARED_BASES_ATTR = "swsc_shared_bases"


class SWSCSharedBases(KeepsTableDtype, nn.Module):
    """Input-side low-rank factors shared by groups of layers (Basis Sharing), stored once in the checkpoint."""

    def __init__(self, shapes: dict[str, tuple[int, int]], dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.bases = nn.ParameterDict(
            {key: nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False) for key, shape in shapes.items()}
        )


# ---- finding and swapping layers ----------------------------------------------------------------------------------
ROUTER = "router of a mixture-of-experts block (kept dense: small and decides every token's experts)"
NOT_CONVERTED = "modules_to_not_convert"
EMBEDDING = "embedding (kept dense)"
KEPT_DENSE_BY_DESIGN = (ROUTER, NOT_CONVERTED, EMBEDDING)
# nn.Linear subclasses whose own forward computes exactly x W^T + b (checked by reading them), so they are converted
LINEAR_EQUIVALENT = {"transformers.models.falcon.modeling_falcon.FalconLinear"}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass
class Targets:
    """What compression replaces: `linears` (exact `nn.Linear`, plain subclasses and transformers' `Conv1D`),
    `experts` (fused mixture-of-experts modules), and the linears it refuses to touch, `skipped` (name -> reason)."""

    linears: list[tuple[str, nn.Module]] = field(default_factory=list)
    experts: list[tuple[str, nn.Module]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def find_targets(model: nn.Module, modules_to_not_convert: list[str], *, log: bool = True) -> Targets:
    """Every layer compression replaces, and every linear it skips with the reason.

    Only layers whose forward is a plain y = x W^T + b are converted: `nn.Linear` and subclasses that keep its
    forward, and `Conv1D` (the transposed linear of GPT-2). An `nn.Linear` subclass with its own forward would lose
    its behaviour, and `nn.MultiheadAttention` reads `out_proj.weight` directly: both are skipped.
    """
    targets = Targets()
    parents = {id(child): module for module in model.modules() for child in module.children()}
    for name, module in model.named_modules():
        if isinstance(module, (SWSCLinear, SWSCExperts)) or not should_convert_module(name, modules_to_not_convert):
            continue
        if is_fused_experts(module):
            targets.experts.append((name, module))
        elif isinstance(module, Conv1D) and type(module).forward is Conv1D.forward:
            targets.linears.append((name, module))
        elif isinstance(module, nn.Linear):
            if isinstance(parents.get(id(module)), nn.MultiheadAttention):
                targets.skipped[name] = "projection of nn.MultiheadAttention, which reads its weight directly"
            elif type(module).forward is not nn.Linear.forward and _qualname(type(module)) not in LINEAR_EQUIVALENT:
                targets.skipped[name] = f"{type(module).__name__} subclasses nn.Linear with its own forward"
            else:
                targets.linears.append((name, module))
    if targets.skipped and log:
        logger.warning("swsc_hf left %d linear layers dense that it cannot replace safely: %s", len(targets.skipped),
                       "; ".join(f"{n} ({why})" for n, why in list(targets.skipped.items())[:5]))
    return targets


def target_linears(model: nn.Module, modules_to_not_convert: list[str]) -> list[tuple[str, nn.Module]]:
    """The linear layers compression replaces (see `find_targets`; fused experts not included)."""
    return find_targets(model, modules_to_not_convert).linears


def target_shapes(model: nn.Module, modules_to_not_convert: list[str]) -> dict[str, tuple[int, int]]:
    """(out, in) of every matrix compression targets, in model order: each linear (a `Conv1D` transposed) and each
    expert's matrices of fused experts, under the names their layouts are recorded by."""
    targets = find_targets(model, modules_to_not_convert, log=False)
    experts = dict(targets.experts)
    linears = dict(targets.linears)
    shapes: dict[str, tuple[int, int]] = {}
    for name, _ in model.named_modules():
        if name in linears:
            shapes[name] = tuple(dense_weight(linears[name]).shape)
        elif name in experts:
            module = experts[name]
            for projection in expert_projections(module):
                for index in range(module.num_experts):
                    shapes[expert_layer_name(name, projection, index)] = expert_shape(module, projection)
    return shapes


def output_head_name(model: nn.Module) -> str | None:
    """The module name of the model's output head (`get_output_embeddings()`), None without one."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        return None
    return next((name for name, module in model.named_modules() if module is head), None)


def plan_head(model: nn.Module, config: SWSCConfig) -> None:
    """With `config.head_bits`, record the output head's layout in `config.compressed_layers` before compression, so
    every path (on load, after load, `bits=` budgets, which leave it out) compresses it so. With
    `config.embedding_from_head`, check before compressing that the head will be compressed and the input embeddings
    are tied to it."""
    if config.head_bits is not None:
        plan_head_layout(model, config)
    if config.embedding_from_head:
        name = output_head_name(model)
        will_compress = name in config.compressed_layers or name in dict(
            find_targets(model, config.modules_to_not_convert, log=False).linears)
        if not will_compress:
            raise ValueError("SWSCConfig.embedding_from_head=True reads the input embeddings from the compressed "
                             f"output head, but {type(model).__name__}'s head {name!r} stays dense; set head_bits= "
                             "(or remove it from modules_to_not_convert), or drop embedding_from_head")
        tied_input_embedding(model, name, require_tie=True)


def plan_head_layout(model: nn.Module, config: SWSCConfig) -> None:
    """Record the `head_bits` layout of the output head in `config.compressed_layers` (unless one is recorded)."""
    name = output_head_name(model)
    if name is None:
        raise ValueError(f"SWSCConfig.head_bits={config.head_bits} compresses the output head, but "
                         f"{type(model).__name__} has none (get_output_embeddings() is None); drop head_bits")
    if name in config.compressed_layers:
        return
    linears = dict(find_targets(model, config.modules_to_not_convert, log=False).linears)
    if name not in linears:
        raise ValueError(f"SWSCConfig.head_bits={config.head_bits} compresses the output head {name!r}, but "
                         f"modules_to_not_convert={config.modules_to_not_convert} keeps it dense (or it is not a "
                         "linear layer); remove it from modules_to_not_convert or drop head_bits")
    config.compressed_layers[name] = config.head_spec(*dense_weight(linears[name]).shape).to_dict()


def is_conv1d(module: nn.Module) -> bool:
    """Whether `module` is transformers' `Conv1D` (GPT-2's linear, its weight stored (in, out))."""
    return isinstance(module, Conv1D)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a linear layer (`Conv1D` stores it transposed)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def dense_matrices_left(model: nn.Module, modules_to_not_convert: list[str]) -> dict[str, tuple[int, str]]:
    """Every weight matrix (floating, 2-D or more) that is not compressed: name -> (weights, reason)."""
    targets = find_targets(model, modules_to_not_convert, log=False)
    pending = {name for name, _ in targets.linears + targets.experts}
    left: dict[str, tuple[int, str]] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, (SWSCLinear, SWSCExperts)) or module_name.endswith(SHARED_BASES_ATTR):
            continue
        for param_name, param in module.named_parameters(recurse=False):
            if not param.is_floating_point() or param.dim() < 2:
                continue
            name = f"{module_name}.{param_name}" if module_name else param_name
            if not should_convert_module(module_name, modules_to_not_convert):
                reason = NOT_CONVERTED
            elif isinstance(module, nn.Embedding):
                reason = EMBEDDING
            elif module_name in targets.skipped:
                reason = targets.skipped[module_name]
            elif module_name in pending:
                reason = "not compressed yet"
            elif module_name.rsplit(".", 1)[-1] in ("gate", "router") and any(
                    is_fused_experts(m) or isinstance(m, SWSCExperts) or isinstance(m, nn.ModuleList)
                    for m in model.get_submodule(module_name.rsplit(".", 1)[0]).children()):
                reason = ROUTER
            else:
                reason = f"{type(module).__name__}.{param_name} is not a layer type swsc_hf compresses"
            left[name] = (param.numel(), reason)
    return left


def swap_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` is."""
    parent, attr = get_module_from_name(model, name)
    setattr(parent, attr, new)


# ---- compressed layers --------------------------------------------------------------------------------------------
def new_layer(spec: LayerSpec, config: SWSCConfig, *, bias: bool, dense_dtype: torch.dtype,
              device: torch.device | str | None = None) -> SWSCLinear:
    """An empty `SWSCLinear` for `spec`: tables in the config's table dtype, the bias in the model's `dense_dtype`."""
    return SWSCLinear(spec, bias=bias, dtype=config.table_torch_dtype(dense_dtype), device=device,
                      bias_dtype=dense_dtype)


def relative_error(dense: torch.Tensor, compressed: CompressedWeight) -> float:
    """||W - W'||_F / ||W||_F."""
    dense = dense.float()
    return float((dense - compressed.dense()).norm() / dense.norm().clamp_min(1e-30))


def install_compressed(model: nn.Module, name: str, compressed: CompressedWeight, config: SWSCConfig) -> SWSCLinear:
    """Replace the dense linear `name` by an `SWSCLinear` holding `compressed` (its bias kept); returns the layer."""
    dense = model.get_submodule(name)
    weight = dense_weight(dense).detach()
    layer = new_layer(compressed.spec, config, bias=dense.bias is not None, dense_dtype=weight.dtype,
                      device=weight.device)
    layer.from_conv1d = isinstance(dense, Conv1D)
    if dense.bias is not None:
        layer.bias = nn.Parameter(dense.bias.detach().clone(), requires_grad=False)
    if compressed.spec.shared_basis is not None:
        link_shared_basis(layer, getattr(model, SHARED_BASES_ATTR))
    layer.load_compressed(compressed, config.table_torch_dtype(weight.dtype), config.int8_codebooks)
    layer.relative_error = relative_error(weight, compressed)
    swap_module(model, name, layer)
    return layer


def install_compressed_experts(model: nn.Module, name: str, compressed: dict[str, list[CompressedWeight]],
                               config: SWSCConfig) -> SWSCExperts:
    """Replace the fused experts module `name` by an `SWSCExperts` holding `compressed` (per projection, per
    expert); expert biases and norms are kept. Returns the new module."""
    experts = model.get_submodule(name)
    stacked = {projection: experts._parameters[projection].detach() for projection in compressed}
    dense_dtype = next(iter(stacked.values())).dtype
    table_dtype = config.table_torch_dtype(dense_dtype)
    specs = {projection: [fitted.spec for fitted in layers] for projection, layers in compressed.items()}
    module = SWSCExperts(experts, specs, dtype=table_dtype, dense_dtype=dense_dtype,
                         device=next(iter(stacked.values())).device)
    for projection, layers in compressed.items():
        for index, (layer, fitted) in enumerate(zip(module.layers(projection), layers, strict=True)):
            layer.load_compressed(fitted, table_dtype, config.int8_codebooks)
            layer.relative_error = relative_error(expert_matrix(stacked[projection], index, module.is_transposed),
                                                  fitted)
    swap_module(model, name, module)
    return module


def replace_with_shells(model: nn.Module, config: SWSCConfig, *, placeholder: bool) -> list[str]:
    """Swap targeted linears for empty `SWSCLinear` shells (on the meta device, before weights load).

    For compress-on-load, each shell keeps a `weight` placeholder so the checkpoint's dense weight has a key to
    land on; the quantize op consumes it. For a compressed checkpoint the layouts come from
    `config.compressed_layers` and only layers listed there are replaced.
    """
    replaced = []
    bases: dict[str, tuple[int, int]] = {}
    targets = find_targets(model, config.modules_to_not_convert)
    tied = tied_weight_names(model)
    for name, linear in targets.linears:
        if not placeholder and name not in config.compressed_layers:
            continue
        if placeholder and f"{name}.weight" in tied:
            continue  # a tied weight (lm_head) never arrives under its own name: compressed after loading instead
        spec = config.layer_spec(name, *dense_weight(linear).shape)
        dtype = linear.weight.dtype
        with torch.device("meta"):
            shell = new_layer(spec, config, bias=linear.bias is not None, dense_dtype=dtype)
            if placeholder:  # the checkpoint's shape: (in, out) for a Conv1D
                shell.weight = nn.Parameter(torch.empty(linear.weight.shape, dtype=dtype), requires_grad=False)
        shell.from_conv1d = isinstance(linear, Conv1D)
        if spec.shared_basis is not None:
            bases[spec.shared_basis] = spec.shared_basis_shape
        swap_module(model, name, shell)
        replaced.append(name)
    for name, experts in targets.experts:
        layers = experts_shell(model, name, experts, config, placeholder=placeholder)
        replaced.extend(layers)
    for name in {name.rsplit(".", 1)[0] for name in replaced if "." in name}:
        parent = model.get_submodule(name)
        if not any(True for _ in parent.parameters(recurse=False)) and not any(True for _ in parent.buffers(False)):
            # nothing of its own to initialise; its _init_weights may reach for a child's `weight` (GPT-2's c_proj)
            parent._is_hf_initialized = True
    unknown = set(config.compressed_layers) - set(replaced)
    if not placeholder and unknown:
        raise ValueError(f"quantization_config lists compressed layers the model does not have as nn.Linear: "
                         f"{sorted(unknown)[:5]}; the checkpoint does not match this architecture")
    if bases:
        with torch.device("meta"):
            setattr(model, SHARED_BASES_ATTR, SWSCSharedBases(bases, dtype=config.table_torch_dtype(model.dtype)))
    if not replaced:
        logger.warning("swsc_hf found no linear layer or experts to compress; check modules_to_not_convert")
    return replaced


def experts_specs(name: str, experts: nn.Module, config: SWSCConfig,
                  allocation: dict[str, LayerSpec] | None = None) -> dict[str, list[LayerSpec]]:
    """The layout of every expert matrix of the fused experts module `name`, per projection."""
    return {
        projection: [config.layer_spec(expert_layer_name(name, projection, index),
                                       *expert_shape(experts, projection), allocation)
                     for index in range(experts.num_experts)]
        for projection in expert_projections(experts)
    }


def experts_shell(model: nn.Module, name: str, experts: nn.Module, config: SWSCConfig, *,
                  placeholder: bool) -> list[str]:
    """Swap a fused experts module for an empty `SWSCExperts` (before weights load); returns its layers' names.

    For compress-on-load the shell keeps each 3-D weight as a placeholder the quantize op consumes; loading a
    checkpoint, the experts are replaced only if `config.compressed_layers` lists them.
    """
    specs = experts_specs(name, experts, config)
    names = [expert_layer_name(name, projection, index) for projection, layer_specs in specs.items()
             for index in range(len(layer_specs))]
    if not placeholder and not any(layer in config.compressed_layers for layer in names):
        return []
    if any(spec.shared_basis is not None for layer_specs in specs.values() for spec in layer_specs):
        raise ValueError(f"{name}: expert layers cannot share a basis; drop share_types for experts")
    dtype = experts._parameters[expert_projections(experts)[0]].dtype
    placeholders = {projection: experts._parameters[projection].shape for projection in specs}
    with torch.device("meta"):
        shell = SWSCExperts(experts, specs, dtype=config.table_torch_dtype(dtype), dense_dtype=dtype)
        if placeholder:
            for projection, shape in placeholders.items():
                shell.register_parameter(projection, nn.Parameter(torch.empty(shape, dtype=dtype),
                                                                  requires_grad=False))
    swap_module(model, name, shell)
    return names


# ---- shared bases -------------------------------------------------------------------------------------------------
def shared_basis_key(module_name: str, group: Iterable[int]) -> str:
    """Key of the basis shared by projection `module_name` (e.g. "q_proj") over the layers in `group`."""
    layers = list(group)
    return f"{module_name.rsplit('.', 1)[-1]}_{layers[0]}_{layers[-1]}"


def set_shared_basis(model: nn.Module, key: str, basis: torch.Tensor) -> None:
    """Store `basis` (already in its table dtype and device) as the model's shared basis `key`."""
    holder = getattr(model, SHARED_BASES_ATTR, None)
    if holder is None:
        holder = SWSCSharedBases({})
        setattr(model, SHARED_BASES_ATTR, holder)
    holder.bases[key] = nn.Parameter(basis, requires_grad=False)


def link_shared_basis(layer: SWSCLinear, holder: SWSCSharedBases) -> None:
    """Point `layer` at the holder of its shared basis: a plain reference, not a child module (saved once)."""
    layer.__dict__["shared_basis_module"] = holder


def link_shared_bases(model: nn.Module) -> None:
    """Link every layer with a shared basis to the model's `SWSCSharedBases`."""
    holder = getattr(model, SHARED_BASES_ATTR, None)
    for name, module in model.named_modules():
        if isinstance(module, SWSCLinear) and module.spec.shared_basis is not None:
            if holder is None or module.spec.shared_basis not in holder.bases:
                raise ValueError(f"{name} uses shared basis {module.spec.shared_basis!r}, which the model lacks")
            link_shared_basis(module, holder)


# ---- the model as a whole -----------------------------------------------------------------------------------------
def record_layouts(model: nn.Module, config: SWSCConfig) -> None:
    """Rewrite `config.compressed_layers` from the model's `SWSCLinear` layers (the loader builds shells from it).

    Run before saving: a compressed LoRA merge changes ranks, and a dequantized layer is no longer compressed.
    """
    config.compressed_layers = {
        name: module.spec.to_dict() for name, module in model.named_modules() if isinstance(module, SWSCLinear)
    }


def mark_compressed(model: nn.Module, config: SWSCConfig, quantizer) -> None:
    """Make a model compressed outside `from_pretrained` look as the loader leaves one: its quantization config,
    `quantizer` as `hf_quantizer` (unless it has one of the same type), `is_quantized`, the method name."""
    model.config.quantization_config = config
    if not isinstance(getattr(model, "hf_quantizer", None), type(quantizer)):
        model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = "swsc"


def tied_input_embedding(model: nn.Module, head_name: str | None, *, require_tie: bool) -> nn.Embedding:
    """The input embedding `SWSCConfig.embedding_from_head` replaces, after checking it can read the output head
    `head_name`: an nn.Embedding (or a scaled one, as Gemma's) of the head's shape, tied to it (`require_tie`; a
    compressed checkpoint was untied when it was saved)."""
    embedding = model.get_input_embeddings()
    model_name = type(model).__name__
    plain = type(embedding) is nn.Embedding
    scaled = (isinstance(embedding, nn.Embedding) and type(embedding).__name__.endswith("ScaledWordEmbedding")
              and isinstance(getattr(embedding, "scalar_embed_scale", None), (int, float)))
    if not (plain or scaled):
        raise ValueError(f"SWSCConfig.embedding_from_head=True: {model_name}'s input embedding is a "
                         f"{type(embedding).__name__}, not an nn.Embedding (or a scaled one, as Gemma's) whose rows "
                         "can be read from the head; drop embedding_from_head")
    head = model.get_submodule(head_name) if head_name else None
    head_shape = (head.out_features, head.in_features) if head is not None else None
    if tuple(embedding.weight.shape) != head_shape:
        raise ValueError(f"SWSCConfig.embedding_from_head=True: {model_name}'s input embedding is "
                         f"{tuple(embedding.weight.shape)} and its output head {head_shape}; drop "
                         "embedding_from_head")
    if require_tie:
        embedding_name = next(name for name, module in model.named_modules() if module is embedding)
        pair = {f"{head_name}.weight", f"{embedding_name}.weight"}
        tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
        if not any({key, source} == pair for key, source in tied.items()):
            raise ValueError(f"SWSCConfig.embedding_from_head=True: {model_name}'s input embedding is a matrix of its "
                             "own, not tied to the output head (tie_word_embeddings=False); drop embedding_from_head")
    return embedding


def read_embeddings_from_head(model: nn.Module, *, require_tie: bool) -> None:
    """`SWSCConfig.embedding_from_head`: put an `SWSCEmbedding` reading the compressed output head in place of the
    input embedding tied to it, whose dense weight is dropped; idempotent."""
    if isinstance(model.get_input_embeddings(), SWSCEmbedding):
        return
    name = output_head_name(model)
    head = model.get_output_embeddings()
    if not isinstance(head, SWSCLinear):
        raise ValueError("SWSCConfig.embedding_from_head=True reads the input embeddings from the compressed output "
                         f"head, but {type(model).__name__}'s head {name!r} is not compressed; set head_bits= or drop "
                         "embedding_from_head")
    embedding = tied_input_embedding(model, name, require_tie=require_tie)
    shape = tuple(embedding.weight.shape)
    model.set_input_embeddings(SWSCEmbedding(head, embedding))
    logger.info("swsc_hf: the input embeddings read the compressed %s (their dense %s copy is dropped)", name, shape)


def tied_weight_names(model: nn.Module) -> set[str]:
    """Names of the weights transformers ties to another tensor (e.g. `lm_head.weight` to the embeddings)."""
    return set(getattr(model, "all_tied_weights_keys", None) or {})


def untie_compressed(model: nn.Module) -> None:
    """A compressed layer stores no `weight`, so it cannot share one: where a compressed layer's weight was tied
    (a compressed head of a model with tied embeddings), drop the tie. The other tensor stays dense, and the config
    says `tie_word_embeddings=False`, so a saved checkpoint reloads without tying them again."""
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    compressed = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, SWSCLinear)}
    untied = {key for key, source in tied.items() if key in compressed or source in compressed}
    if not untied:
        return
    model.all_tied_weights_keys = {key: source for key, source in tied.items() if key not in untied}
    for config in (model.config, model.config.get_text_config(decoder=True)):
        if getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False
    logger.info("swsc_hf: untied %s (compressed) from the dense tensor it shared", sorted(untied))


def round_codebooks_to_int8(model: nn.Module) -> None:
    """Put every codebook of `model`'s compressed layers (experts' too) on its 8-bit grid, in its stored dtype
    (`SWSCConfig.int8_codebooks`, `core.compress.int8_grid_codebook`)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SWSCLinear) and module.spec.n_clusters:
                module.codebook.data = int8_grid_codebook(module.codebook.data)


def finalize_compressed_model(model: nn.Module, config: SWSCConfig) -> None:
    """After loading or compressing: record layouts, freeze compressed tensors, link shared bases, check codes and
    values, decode through swsc_hf's dense GEMV and decode attention, and make `save_pretrained` atomic."""
    for name, module in model.named_modules():
        if isinstance(module, SWSCExperts):
            waiting = [p for p in module.projections if p in module._parameters]
            if waiting:
                raise RuntimeError(f"{name}.{waiting[0]} never arrived from the checkpoint, so the experts were not "
                                   "compressed")
        if not isinstance(module, SWSCLinear):
            continue
        if "weight" in module._parameters:
            raise RuntimeError(f"{name}.weight never arrived from the checkpoint, so the layer was not compressed")
        for param in module.parameters(recurse=False):
            param.requires_grad_(False)
        validate_codes(name, module)
        check_finite(name, module)
    record_layouts(model, config)
    if config.embedding_from_head:
        read_embeddings_from_head(model, require_tie=True)
    untie_compressed(model)
    use_dense_gemv(model)
    use_decode_attention(model)
    missed = {name: reason for name, (_, reason) in dense_matrices_left(model, config.modules_to_not_convert).items()
              if reason not in KEPT_DENSE_BY_DESIGN}
    if missed:
        logger.warning("swsc_hf left %d weight matrices dense that it does not compress: %s", len(missed),
                       "; ".join(f"{n} ({why})" for n, why in list(missed.items())[:8]))
    link_shared_bases(model)
    holder = getattr(model, SHARED_BASES_ATTR, None)
    if holder is not None:
        holder.requires_grad_(False)
        check_finite(f"{SHARED_BASES_ATTR}.bases", holder.bases)
    finish_loading(model)
    install_atomic_save(model)


def use_dense_gemv(model: nn.Module) -> None:
    """Where the output head stays a plain nn.Linear, run its decode steps on swsc_hf's dense GEMV: its class becomes
    `SWSCDenseLinear` in place, so the module, its parameters (a tie to the input embeddings included), hooks and
    state dict stay as they are."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if type(head) is nn.Linear:
        head.__class__ = SWSCDenseLinear


@torch.no_grad()
def dense_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype | None = None) -> nn.Linear:
    """An nn.Linear holding `weight` (out x in) and `bias`, in `dtype` (the weight's by default)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                       dtype=dtype or weight.dtype)
    linear.weight.copy_(weight)
    if bias is not None:
        linear.bias.copy_(bias)
    return linear


@torch.no_grad()
def dense_layer(layer: SWSCLinear, dtype: torch.dtype | None = None) -> nn.Module:
    """The dense layer an `SWSCLinear` stands for: an nn.Linear, or a `Conv1D` where it replaced one."""
    if not getattr(layer, "from_conv1d", False):
        return dense_linear(layer.dequantize(), layer.bias, dtype)
    weight = layer.dequantize()
    conv = Conv1D(weight.shape[0], weight.shape[1]).to(device=weight.device, dtype=dtype or weight.dtype)
    conv.weight.copy_(weight.t())
    if layer.bias is not None:
        conv.bias.copy_(layer.bias)
    return conv


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype | str | None = None) -> nn.Module:
    """Replace every `SWSCLinear` with an nn.Linear holding its dense weight (for `model.dequantize()`); a rotated
    residual stream is rotated back and the attention goes back to "sdpa", so the result is a plain model of its
    architecture."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    for name, module in list(model.named_modules()):
        if isinstance(module, SWSCExperts):
            swap_module(model, name, module.dense_experts(dtype))
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for name, module in list(model.named_modules()):
        if isinstance(module, SWSCLinear):
            swap_module(model, name, dense_layer(module, dtype))
    if isinstance(embedding, SWSCEmbedding):
        model.set_input_embeddings(embedding.dense_embedding(model.get_output_embeddings().weight))
    for module in model.modules():
        if type(module) is SWSCDenseLinear:
            module.__class__ = nn.Linear
    if hasattr(model, SHARED_BASES_ATTR):
        delattr(model, SHARED_BASES_ATTR)
    remove_rotation(model)
    use_sdpa_attention(model)
    return model
