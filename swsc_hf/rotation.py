"""Rotating a decoder's residual stream before compression (QuaRot; SpinQuant's R1 with a random Hadamard matrix).

Every weight that reads the residual stream (through a layer norm) or writes to it is multiplied by one orthogonal
Q = diag(signs) H / sqrt(d), H a Hadamard matrix (`core.hadamard`): a reader W becomes W diag(g) Q, the norm's gain g
folded in and the norm's weight set to 1 (an RMS norm commutes with Q, a gain does not); a writer W becomes Q^T W and
its bias b becomes b Q. The model computes the same function up to float rounding while its stream carries x Q, and
each weight row mixes all of the stream's channels, so no input the activations single out keeps outsized weights.
The embedding and the final norm keep their weights (a tied output head stays tied): they become subclasses of
their own classes that rotate the embeddings' output and un-rotate the stream before the final norm by the model's
`ResidualRotation`, a product with H's small factors each.

Supported: decoders whose layers read the stream through `input_layernorm` -> q/k/v projections and
`post_attention_layernorm` -> gate/up projections and write it through `o_proj` and `down_proj`, with RMS norms (Llama,
Mistral, Qwen2/3, SmolLM). Anything else is refused before a weight changes, by its structure or by a probe: a copy
of the first layer, rotated, must give the model's logits.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from .core.hadamard import hadamard_factors, hadamard_product

logger = logging.getLogger(__name__)

ROTATION_ATTR = "swsc_rotation"
ATTENTION_READERS = ("q_proj", "k_proj", "v_proj")
MLP_READERS = ("gate_proj", "up_proj")
# Modules of a layer that neither read nor write the stream (Qwen3's per-head norms act after the projections).
STREAM_FREE = ("self_attn.q_norm", "self_attn.k_norm")
# Largest relative change of the probe's logits accepted as float rounding, by the weights' dtype.
PROBE_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3}
HALF_PROBE_TOLERANCE = 5e-2
PROBE_TOKENS = 8


class ResidualRotation(nn.Module):
    """The stream's rotation Q = diag(signs) H / sqrt(d). Stored: `signs` (d values of +-1); H is rebuilt from d."""

    def __init__(self, signs: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("signs", signs)
        self.size = signs.numel()
        self.factor_count = 0
        self.build_factors()

    def build_factors(self) -> None:
        """(Re)build H's factors beside `signs`: not saved, and made on the meta device when a model is loaded."""
        device = None if self.signs.device.type == "meta" else self.signs.device
        factors = hadamard_factors(self.size)
        for index, factor in enumerate(factors):
            self.register_buffer(f"factor_{index}", factor.to(device=device, dtype=torch.float32), persistent=False)
        self.factor_count = len(factors)

    @property
    def factors(self) -> list[torch.Tensor]:
        return [getattr(self, f"factor_{index}") for index in range(self.factor_count)]

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x Q over the last dimension, in x's dtype."""
        return hadamard_product(x * self.signs.to(x), self.factors) * self.size**-0.5

    def unrotate(self, x: torch.Tensor) -> torch.Tensor:
        """x Q^T over the last dimension, in x's dtype."""
        return hadamard_product(x, self.factors, transpose=True) * (self.signs.to(x) * self.size**-0.5)

    def extra_repr(self) -> str:
        return f"size={self.size}, hadamard_factors={[f.shape[0] for f in self.factors]}"


def stream_blocks(model: nn.Module) -> list[tuple[nn.Module, list[nn.Linear], nn.Linear]]:
    """(norm, readers, writer) of every attention and MLP block, in model order; ValueError naming what does not fit
    the supported structure (module docstring)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None or not hasattr(decoder, "norm") or model.get_input_embeddings() is None:
        raise ValueError(f"SWSCConfig.rotate_residual needs a decoder with `layers`, a final `norm` and input "
                         f"embeddings; {type(model).__name__} has not; set rotate_residual=False")
    for index, layer in enumerate(layers):
        check_layer(layer, f"layer {index} of {type(model).__name__}")
    return [block for layer in layers for block in layer_blocks(layer)]


def check_layer(layer: nn.Module, where: str) -> None:
    """ValueError unless `layer` is a supported decoder layer (module docstring) with dense linears."""
    linears = [f"self_attn.{name}" for name in (*ATTENTION_READERS, "o_proj")]
    linears += [f"mlp.{name}" for name in (*MLP_READERS, "down_proj")]
    norms = ["input_layernorm", "post_attention_layernorm"]
    missing = [name for name in linears if not isinstance(submodule(layer, name), nn.Linear)]
    missing += [name for name in norms if getattr(submodule(layer, name), "weight", None) is None]
    owners = {name.rpartition(".")[0] for name, _ in layer.named_parameters()}
    unknown = sorted(owners - {*linears, *norms, *STREAM_FREE})
    if missing or unknown:
        raise ValueError(
            "SWSCConfig.rotate_residual supports decoder layers that read the residual stream through input_layernorm"
            " -> q/k/v_proj and post_attention_layernorm -> gate/up_proj and write it through o_proj and down_proj, "
            f"all dense nn.Linear, before compression; {where} lacks {missing or 'nothing'} and also has "
            f"{unknown or 'nothing else'}; set rotate_residual=False")


def layer_blocks(layer: nn.Module) -> list[tuple[nn.Module, list[nn.Linear], nn.Linear]]:
    """The (norm, readers, writer) of a checked layer's attention and MLP blocks."""
    attention, mlp = layer.self_attn, layer.mlp
    return [(layer.input_layernorm, [getattr(attention, name) for name in ATTENTION_READERS], attention.o_proj),
            (layer.post_attention_layernorm, [getattr(mlp, name) for name in MLP_READERS], mlp.down_proj)]


def submodule(module: nn.Module, name: str) -> nn.Module | None:
    """`module.get_submodule(name)`, or None where there is none."""
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None


@torch.no_grad()
def rotate_block(norm: nn.Module, readers: list[nn.Linear], writer: nn.Linear, rotation: ResidualRotation) -> None:
    """Fold `norm`'s gain into `readers`, rotate their inputs and `writer`'s outputs by Q (float64 arithmetic)."""
    transform_block(readers, writer, rotation.rotate, gain=norm.weight.double())
    norm.weight.fill_(1.0)


@torch.no_grad()
def unrotate_block(readers: list[nn.Linear], writer: nn.Linear, rotation: ResidualRotation) -> None:
    """The inverse of `rotate_block`'s rotation (the folded gains stay in the readers; the norms' weights stay 1)."""
    transform_block(readers, writer, rotation.unrotate)


def transform_block(readers: list[nn.Linear], writer: nn.Linear, apply, gain: torch.Tensor | None = None) -> None:
    """`apply` (x -> x Q or x Q^T, float64) to the readers' rows, times `gain` first, and to the writer's columns and
    bias."""
    for reader in readers:
        weight = reader.weight.double()
        reader.weight.copy_(apply(weight if gain is None else weight * gain))
    writer.weight.copy_(apply(writer.weight.double().T).T)
    if writer.bias is not None:
        writer.bias.copy_(apply(writer.bias.double()))


def attach_rotation(model: nn.Module) -> ResidualRotation:
    """Give `model` its `ResidualRotation` (placeholder signs of +1 until a checkpoint's arrive) and the rotating
    forwards of its input embedding and final norm; idempotent."""
    rotation = getattr(model, ROTATION_ATTR, None)
    if rotation is None:
        embedding = model.get_input_embeddings()
        signs = torch.ones(embedding.embedding_dim, dtype=embedding.weight.dtype, device=embedding.weight.device)
        rotation = ResidualRotation(signs)
        setattr(model, ROTATION_ATTR, rotation)
    install_stream_rotation(model, rotation)
    return rotation


def finish_loading(model: nn.Module) -> None:
    """After a checkpoint's tensors arrived: H's factors rebuilt where the signs now are."""
    rotation = getattr(model, ROTATION_ATTR, None)
    if rotation is not None:
        rotation.build_factors()


# Subclasses made by `rotating_class`, by (base class, what they do).
ROTATING_CLASSES: dict[tuple[type, str], type] = {}


def rotating_class(base: type, role: str) -> type:
    """A subclass of `base` whose forward rotates its output ("embedding") or un-rotates its input ("final_norm") by
    the `residual_rotation` it holds. A class, not a hook: torch.compile guards on module types but not on hooks, so
    a graph compiled for the plain class is never reused for the rotating one."""
    if (base, role) not in ROTATING_CLASSES:
        if role == "embedding":
            def forward(self, *args, **kwargs):
                return self.residual_rotation.rotate(base.forward(self, *args, **kwargs))
        else:
            def forward(self, hidden_states, *args, **kwargs):
                return base.forward(self, self.residual_rotation.unrotate(hidden_states), *args, **kwargs)
        name = f"StreamRotating{base.__name__}"
        cls = type(name, (base,), {"forward": forward, "__module__": __name__, "__qualname__": name,
                                   "rotates_stream": True})
        globals()[name] = cls  # found by name, so a rotated model pickles in this process
        ROTATING_CLASSES[(base, role)] = cls
    return ROTATING_CLASSES[(base, role)]


def stream_ends(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """The modules where the rotated stream begins and ends, with their `rotating_class` roles."""
    return [(model.get_input_embeddings(), "embedding"), (model.get_decoder().norm, "final_norm")]


def install_stream_rotation(model: nn.Module, rotation: ResidualRotation) -> None:
    """Make the input embedding rotate its output and the final norm un-rotate its input (once each)."""
    for module, role in stream_ends(model):
        module.__dict__["residual_rotation"] = rotation  # a reference, not a child module (saved once)
        if not getattr(type(module), "rotates_stream", False):
            module.__class__ = rotating_class(type(module), role)


def uninstall_stream_rotation(model: nn.Module) -> None:
    """Undo `install_stream_rotation`."""
    for module, _ in stream_ends(model):
        if getattr(type(module), "rotates_stream", False):
            module.__class__ = type(module).__bases__[0]
        module.__dict__.pop("residual_rotation", None)


@torch.no_grad()
def rotate_residual_stream(model: nn.Module, seed: int = 0) -> ResidualRotation:
    """Rotate `model`'s residual stream by a random Hadamard rotation (signs drawn from `seed`), in place, before
    compression; the model's outputs stay the same up to float rounding. ValueError (the model untouched) where
    the model is not of the supported kind (module docstring), is already rotated or holds no dense weights."""
    if hasattr(model, ROTATION_ATTR):
        raise ValueError("SWSCConfig.rotate_residual: this model's residual stream is already rotated")
    blocks = stream_blocks(model)
    weights = [linear.weight for _, readers, writer in blocks for linear in (*readers, writer)]
    if any(weight.device.type == "meta" for weight in weights):
        raise ValueError("SWSCConfig.rotate_residual needs the dense weights in memory (not offloaded to disk or "
                         "the meta device); load the model without offloading, or set rotate_residual=False")
    embedding = model.get_input_embeddings()
    size = embedding.embedding_dim
    generator = torch.Generator().manual_seed(seed)
    signs = (torch.randint(0, 2, (size,), generator=generator) * 2 - 1).to(embedding.weight)
    try:
        rotation = ResidualRotation(signs)
    except ValueError as error:
        raise ValueError(f"SWSCConfig.rotate_residual: the hidden size {size} has no Hadamard matrix here ({error}); "
                         "set rotate_residual=False") from None
    probe_first_layer(model, rotation)
    for norm, readers, writer in blocks:
        rotate_block(norm, readers, writer, rotation)
    setattr(model, ROTATION_ATTR, rotation)
    install_stream_rotation(model, rotation)
    logger.info("swsc_hf: rotated the residual stream (%d channels, Hadamard factors %s)", size,
                [factor.shape[0] for factor in rotation.factors])
    return rotation


@torch.no_grad()
def probe_first_layer(model: nn.Module, rotation: ResidualRotation) -> None:
    """Run the model with its first layer alone, as it is and as a rotated copy; ValueError if their logits
    differ by more than float rounding (a norm that is not an RMS norm, a module reading the stream elsewhere)."""
    decoder = model.get_decoder()
    layers = decoder.layers
    first = layers[0]
    rotated = copy.deepcopy(first)
    for norm, readers, writer in layer_blocks(rotated):
        rotate_block(norm, readers, writer, rotation)
    device = model.get_input_embeddings().weight.device
    ids = torch.randint(0, model.get_input_embeddings().num_embeddings, (1, PROBE_TOKENS),
                        generator=torch.Generator().manual_seed(0)).to(device)
    try:
        decoder.layers = nn.ModuleList([first])
        expected = model(input_ids=ids, use_cache=False).logits.float()
        decoder.layers = nn.ModuleList([rotated])
        install_stream_rotation(model, rotation)
        try:
            got = model(input_ids=ids, use_cache=False).logits.float()
        finally:
            uninstall_stream_rotation(model)
    finally:
        decoder.layers = layers
    change = ((got - expected).norm() / expected.norm().clamp_min(1e-30)).item()
    tolerance = PROBE_TOLERANCE.get(first.input_layernorm.weight.dtype, HALF_PROBE_TOLERANCE)
    if not change <= tolerance:
        raise ValueError(f"SWSCConfig.rotate_residual: rotating {type(model).__name__}'s first layer changed its "
                         f"outputs by {change:.2e} (relative; float rounding allows {tolerance:.0e}): its norms are "
                         "not RMS norms with a gain, or something else reads the residual stream; set "
                         "rotate_residual=False")


@torch.no_grad()
def remove_rotation(model: nn.Module) -> None:
    """Turn a rotated model with dense linears back into a plain one (for `dequantize`): weights un-rotated, the
    rotating forwards and the `ResidualRotation` removed. The norms' gains stay folded in the readers (weights 1)."""
    rotation = getattr(model, ROTATION_ATTR, None)
    if rotation is None:
        return
    for _, readers, writer in stream_blocks(model):
        unrotate_block(readers, writer, rotation)
    uninstall_stream_rotation(model)
    delattr(model, ROTATION_ATTR)
