"""`compression_report`: what a compressed model stores, per layer and in total, counting every stored byte."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .config import DEFAULT_NOT_CONVERT
from .model_ops import KEPT_DENSE_BY_DESIGN, SHARED_BASES_ATTR, dense_matrices_left
from .modules import SWSCLinear


@dataclass
class LayerReport:
    name: str
    stored_bytes: int
    dense_bytes: int
    relative_error: float | None
    weights: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.stored_bytes / self.weights


@dataclass
class CompressionReport:
    """Stored vs dense bytes. Dense bytes count each compressed weight at the model's float width (`model.dtype`)."""

    layers: list[LayerReport] = field(default_factory=list)
    compressed_stored_bytes: int = 0
    compressed_dense_bytes: int = 0
    compressed_weights: int = 0
    model_stored_bytes: int = 0
    model_dense_bytes: int = 0
    model_weights: int = 0
    # every weight matrix left dense: name -> (weights, reason); embeddings, the head, routers and
    # `modules_to_not_convert` are kept dense by design, anything else is a layer swsc_hf could not compress
    left_dense: dict[str, tuple[int, str]] = field(default_factory=dict)

    @property
    def uncompressed(self) -> dict[str, str]:
        """The weight matrices left dense that are not dense by design (name -> reason): what compression missed."""
        return {name: reason for name, (_, reason) in self.left_dense.items() if reason not in KEPT_DENSE_BY_DESIGN}

    @property
    def compressed_fraction(self) -> float:
        """Compressed weights / weights of all matrices that are not dense by design (1.0: nothing missed)."""
        missed = sum(count for name, (count, _) in self.left_dense.items() if name in self.uncompressed)
        return self.compressed_weights / max(self.compressed_weights + missed, 1)

    @property
    def compressed_bits_per_weight(self) -> float:
        """Average stored bits per weight of the compressed layers (codebooks, codes, scales, factors, bases)."""
        return 8 * self.compressed_stored_bytes / max(self.compressed_weights, 1)

    @property
    def model_bits_per_weight(self) -> float:
        """Average stored bits per parameter of the whole model, dense parts included."""
        return 8 * self.model_stored_bytes / max(self.model_weights, 1)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["compressed_bits_per_weight"] = self.compressed_bits_per_weight
        out["compressed_fraction"] = self.compressed_fraction
        out["model_bits_per_weight"] = self.model_bits_per_weight
        for layer, row in zip(self.layers, out["layers"], strict=True):
            row["bits_per_weight"] = layer.bits_per_weight
        return out

    def summary(self) -> str:
        """A short human summary (two lines, or one for a dense model) without the per-layer table."""
        if not self.layers:
            return (f"dense (no compressed layers): {self.model_weights:,} parameters, "
                    f"{self.model_stored_bytes / 2**20:.2f} MiB")
        errors = [layer.relative_error for layer in self.layers if layer.relative_error is not None]
        error = f", mean relative weight error {sum(errors) / len(errors):.4f}" if errors else ""
        return (f"{len(self.layers)} compressed layers: {self.compressed_bits_per_weight:.3f} bits/weight "
                f"({self.compressed_stored_bytes / 2**20:.2f} MiB stored vs {self.compressed_dense_bytes / 2**20:.2f} "
                f"MiB dense){error}\nwhole model: {self.model_bits_per_weight:.3f} bits/parameter "
                f"({self.model_stored_bytes / 2**20:.2f} MiB vs {self.model_dense_bytes / 2**20:.2f} MiB dense)")

    def __str__(self) -> str:
        """The per-layer table, then `summary()` (a dense model: the summary alone)."""
        if not self.layers:
            return self.summary()
        lines = [f"{'layer':60s} {'bits/w':>7s} {'stored KiB':>11s} {'rel err':>8s}"]
        for layer in self.layers:
            err = "-" if layer.relative_error is None else f"{layer.relative_error:.4f}"
            lines.append(f"{layer.name:60s} {layer.bits_per_weight:7.3f} {layer.stored_bytes / 1024:11.1f} {err:>8s}")
        lines.append(self.summary())
        if self.uncompressed:
            lines.append(f"left dense ({100 * (1 - self.compressed_fraction):.1f}% of the weights swsc_hf could "
                         f"compress): " + "; ".join(f"{n} ({why})" for n, why in self.uncompressed.items()))
        return "\n".join(lines)


def _nbytes(tensor) -> int:
    return tensor.numel() * tensor.element_size()


def compression_report(model: nn.Module) -> CompressionReport:
    """Per-layer and whole-model sizes of an swsc_hf model; shared bases are counted once, split over their users."""
    report = CompressionReport()
    holder = getattr(model, SHARED_BASES_ATTR, None)
    users: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, SWSCLinear) and module.spec.shared_basis is not None:
            users[module.spec.shared_basis] = users.get(module.spec.shared_basis, 0) + 1
    counted: set[int] = set()
    dense_element_bytes = torch.finfo(model.dtype).bits // 8 if hasattr(model, "dtype") else 4
    for name, module in model.named_modules():
        if not isinstance(module, SWSCLinear):
            continue
        stored = sum(_nbytes(t) for n, t in module.named_parameters(recurse=False) if n != "bias")
        stored += sum(_nbytes(t) for t in module.buffers(recurse=False))
        if module.spec.shared_basis is not None:
            stored += _nbytes(holder.bases[module.spec.shared_basis]) // users[module.spec.shared_basis]
        weights = module.in_features * module.out_features
        layer = LayerReport(name, stored, weights * dense_element_bytes, module.relative_error, weights)
        report.layers.append(layer)
        report.compressed_stored_bytes += stored
        report.compressed_dense_bytes += layer.dense_bytes
        report.compressed_weights += weights
        counted.update(id(t) for t in module.parameters(recurse=False) if t is not module.bias)
        counted.update(id(t) for t in module.buffers(recurse=False))
    if holder is not None:
        counted.update(id(t) for t in holder.parameters())
    other = [t for t in {id(t): t for t in model.parameters()}.values() if id(t) not in counted]
    other_bytes = sum(_nbytes(t) for t in other)
    report.model_stored_bytes = report.compressed_stored_bytes + other_bytes
    report.model_dense_bytes = report.compressed_dense_bytes + other_bytes
    report.model_weights = report.compressed_weights + sum(t.numel() for t in other)
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    not_convert = getattr(config, "modules_to_not_convert", None)
    if isinstance(config, dict):
        not_convert = config.get("modules_to_not_convert")
    report.left_dense = dense_matrices_left(model, DEFAULT_NOT_CONVERT if not_convert is None else not_convert)
    return report
