"""`SWSCLinear`: a linear layer stored as shared terms (codebook + bit-packed codes + scales + low-rank factors)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .core.compress import CompressedWeight, reconstruct_channels, to_weight
from .core.packing import pack_codes, unpack_codes
from .core.spec import LayerSpec

# The codebook term is rebuilt in tiles of at most this many weights, so a forward never holds a whole dense matrix.
TILE_ELEMENTS = 1 << 22


class SWSCLinear(nn.Module):
    """y = x W'^T + b with W' = scales * codebook[codes] + lowrank_a @ lowrank_b.

    Float tables are kept in `dtype` (the stored table dtype) and cast to the input's dtype in the forward; the
    bias keeps the model's dtype (`bias_dtype`).

    Not an `nn.Linear` on purpose: transformers re-initialises every nn.Linear weight and PEFT would treat it as
    dense. Codes stay bit-packed in memory (a uint8 buffer) and are unpacked per tile in the forward. With one
    representative per whole channel (the SWSC paper's layout, no scales) the forward never rebuilds the weight:
    y = (x C^T)[..., idx] for output channels, or the inputs summed per cluster then multiplied by C for input ones.
    """

    def __init__(
        self,
        spec: LayerSpec,
        bias: bool = False,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        bias_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.in_features = spec.in_features
        self.out_features = spec.out_features
        self.shared_basis_module: nn.Module | None = None
        for name, shape in spec.tensor_shapes().items():
            if name == "codes":
                self.register_buffer("codes", torch.zeros(shape, dtype=torch.uint8, device=device))
            else:
                tensor = torch.zeros(shape, dtype=dtype, device=device)
                self.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
        bias_dtype = bias_dtype or dtype
        self.dense_dtype = bias_dtype or torch.get_default_dtype()
        self.bias = nn.Parameter(torch.zeros(spec.out_features, dtype=bias_dtype, device=device)) if bias else None
        self.relative_error: float | None = None

    # ---- construction --------------------------------------------------------------------------------------
    @staticmethod
    def stored_tensors(compressed: CompressedWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The tensors a layer stores for `compressed`: floats in `dtype`, codes bit-packed."""
        spec = compressed.spec
        out: dict[str, torch.Tensor] = {}
        if spec.n_clusters:
            out["codebook"] = compressed.codebook.to(dtype)
            out["codes"] = pack_codes(compressed.codes, spec.code_bits)
            if compressed.scales is not None:
                out["scales"] = compressed.scales.to(dtype)
        if spec.rank:
            out["lowrank_a"] = compressed.lowrank_a.to(dtype).contiguous()
            if spec.shared_basis is None:
                out["lowrank_b"] = compressed.lowrank_b.to(dtype).contiguous()
        return out

    def load_compressed(self, compressed: CompressedWeight, dtype: torch.dtype) -> None:
        """Install fitted terms (replacing the placeholders)."""
        for name, tensor in self.stored_tensors(compressed, dtype).items():
            if name == "codes":
                self.codes = tensor
            else:
                setattr(self, name, nn.Parameter(tensor, requires_grad=False))

    @property
    def basis(self) -> torch.Tensor | None:
        """The input-side low-rank factor: this layer's own, or the one it shares with its group."""
        if not self.spec.rank:
            return None
        if self.spec.shared_basis is None:
            return self.lowrank_b
        return self.shared_basis_module.bases[self.spec.shared_basis]

    # ---- compute -------------------------------------------------------------------------------------------
    def unpacked_codes(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Codes of channels start:stop as (rows, segments) int64."""
        spec = self.spec
        stop = spec.channels if stop is None else stop
        per = spec.segments_per_channel
        flat = unpack_codes(self.codes, spec.code_bits, (stop - start) * per, start * per)
        return flat.reshape(stop - start, per)

    def channel_tile(self, start: int, stop: int) -> torch.Tensor:
        """Channels start:stop of the codebook term (in the codebook's dtype)."""
        scales = getattr(self, "scales", None)
        return reconstruct_channels(self.spec, self.codebook, self.unpacked_codes(start, stop), scales, start)

    def _tiles(self):
        rows = max(1, TILE_ELEMENTS // self.spec.channel_length)
        for start in range(0, self.spec.channels, rows):
            stop = min(start + rows, self.spec.channels)
            yield start, stop, self.channel_tile(start, stop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        out = None
        if spec.n_clusters:
            out = self._codebook_forward(x)
        if spec.rank:
            low = F.linear(F.linear(x, self.basis.to(x.dtype)), self.lowrank_a.to(x.dtype))
            out = low if out is None else out + low
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out

    def _codebook_forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if spec.segments_per_channel == 1 and not spec.scale_groups and spec.n_codebooks == 1:
            return self._whole_channel_forward(x)
        if spec.cluster_dim == "output":
            parts = [F.linear(x, tile.to(x.dtype)) for _, _, tile in self._tiles()]
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        out = x.new_zeros(*x.shape[:-1], spec.out_features)
        for start, stop, tile in self._tiles():  # tile = rows start:stop of W^T
            out = out + x[..., start:stop] @ tile.to(x.dtype)
        return out

    def _whole_channel_forward(self, x: torch.Tensor) -> torch.Tensor:
        """SWSC's layout: one codebook of whole channels, so gather outputs (or sum inputs) per cluster."""
        centroids = self.codebook[0, :, :].to(x.dtype)  # (k, channel_length)
        idx = self.unpacked_codes()[:, 0]
        if self.spec.cluster_dim == "output":
            return F.linear(x, centroids)[..., idx]
        summed = x.new_zeros(*x.shape[:-1], self.spec.n_clusters).index_add_(-1, idx, x)
        return summed @ centroids

    @torch.no_grad()
    def dequantize(self) -> torch.Tensor:
        """The dense (out x in) weight this layer represents, in the model's dtype."""
        spec = self.spec
        dtype = self.dense_dtype
        weight = torch.zeros(spec.out_features, spec.in_features, dtype=torch.float32, device=self.codes.device
                             if spec.n_clusters else self.lowrank_a.device)
        if spec.n_clusters:
            channels = torch.cat([tile.float() for _, _, tile in self._tiles()])
            weight += to_weight(channels, spec)
        if spec.rank:
            weight += self.lowrank_a.float() @ self.basis.float().to(weight.device)
        return weight.to(dtype)

    def extra_repr(self) -> str:
        spec = self.spec
        parts = [f"in_features={spec.in_features}", f"out_features={spec.out_features}"]
        if spec.n_clusters:
            parts += [f"n_clusters={spec.n_clusters}", f"segment_length={spec.segment_length}",
                      f"cluster_dim={spec.cluster_dim}"]
            if spec.scale_group_size:
                parts.append(f"scale_group_size={spec.scale_group_size}")
        if spec.rank:
            parts.append(f"rank={spec.rank}" + (f" (shared basis {spec.shared_basis})" if spec.shared_basis else ""))
        return ", ".join(parts + [f"bias={self.bias is not None}"])
