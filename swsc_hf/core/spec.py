"""The layout of one compressed matrix: every shape and size follows from a `LayerSpec`.

A compressed weight W (out x in) is a sum of shared terms:

    W ~= scales * codebook[codes]  +  lowrank_a @ lowrank_b

The codebook term works on the *channel matrix* M (M = W when `cluster_dim == "output"`, the rows are channels;
M = W^T when `cluster_dim == "input"`). Every channel is cut into segments of `segment_length` values; each segment
is replaced by one of `n_clusters` shared vectors of a codebook (one codebook per `rows_per_codebook` channels, or
one per matrix). With `segment_length` equal to the channel length this is SWSC (one representative per channel);
with `segment_length == 1` it is scalar weight clustering (K shared values); in between it is vector quantization.
An optional scale per channel and group of `scale_group_size` values normalizes segments before they are matched.
The low-rank term holds the error compensation of SWSC, or the whole weight in Basis Sharing (where the input-side
factor `lowrank_b` is shared by a group of layers).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from .packing import bits_for, packed_nbytes

CLUSTER_DIMS = ("output", "input")


@dataclass(frozen=True)
class LayerSpec:
    """Resolved sizes of one compressed linear layer (what the checkpoint's tensors must look like)."""

    out_features: int
    in_features: int
    n_clusters: int = 0
    segment_length: int = 1
    cluster_dim: str = "output"
    rank: int = 0
    scale_group_size: int = 0
    rows_per_codebook: int = 0
    shared_basis: str | None = None

    def __post_init__(self) -> None:
        def fail(field: str, allowed: str) -> None:
            raise ValueError(f"LayerSpec.{field}={getattr(self, field)!r} is invalid: {allowed}")

        for field in ("out_features", "in_features", "n_clusters", "segment_length", "rank", "scale_group_size",
                      "rows_per_codebook"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                fail(field, "must be an int")
        if not isinstance(self.cluster_dim, str):
            fail("cluster_dim", f"use one of {CLUSTER_DIMS}")
        if self.shared_basis is not None and not isinstance(self.shared_basis, str):
            fail("shared_basis", "use None or the name of a shared basis")
        if self.out_features < 1 or self.in_features < 1:
            fail("out_features", "both feature sizes must be >= 1")
        if self.cluster_dim not in CLUSTER_DIMS:
            fail("cluster_dim", f"use one of {CLUSTER_DIMS}")
        if self.n_clusters < 0 or self.n_clusters > 2**16:
            fail("n_clusters", "use 0 (no codebook term) to 65536")
        if self.n_clusters:
            if self.segment_length < 1 or self.channel_length % self.segment_length:
                fail("segment_length", f"must divide the channel length {self.channel_length}")
            if self.scale_group_size < 0 or (self.scale_group_size and self.channel_length % self.scale_group_size):
                fail("scale_group_size", f"use 0 (no scales) or a divisor of {self.channel_length}")
            if self.scale_group_size and self.scale_group_size % self.segment_length:
                fail("scale_group_size", f"must be a multiple of segment_length={self.segment_length}")
            if self.rows_per_codebook < 0:
                fail("rows_per_codebook", "use 0 (one codebook per matrix) or a positive number of channels")
        # a basis shared by a group of layers may have more directions than one layer has outputs
        max_rank = self.in_features if self.shared_basis else min(self.out_features, self.in_features)
        if self.rank < 0 or self.rank > max_rank:
            fail("rank", f"use 0 to {max_rank}")
        if not self.n_clusters and not self.rank:
            fail("n_clusters", "a layer needs a codebook term (n_clusters > 0) or a low-rank term (rank > 0)")

    # ---- derived sizes -------------------------------------------------------------------------------------
    @property
    def channels(self) -> int:
        return self.out_features if self.cluster_dim == "output" else self.in_features

    @property
    def channel_length(self) -> int:
        return self.in_features if self.cluster_dim == "output" else self.out_features

    @property
    def segments_per_channel(self) -> int:
        return self.channel_length // self.segment_length

    @property
    def n_codes(self) -> int:
        return self.channels * self.segments_per_channel if self.n_clusters else 0

    @property
    def code_bits(self) -> int:
        return bits_for(self.n_clusters) if self.n_clusters else 0

    @property
    def n_codebooks(self) -> int:
        if not self.n_clusters:
            return 0
        return math.ceil(self.channels / self.rows_per_codebook) if self.rows_per_codebook else 1

    @property
    def channels_per_codebook(self) -> int:
        return self.rows_per_codebook or self.channels

    @property
    def scale_groups(self) -> int:
        return self.channel_length // self.scale_group_size if self.scale_group_size and self.n_clusters else 0

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the stored tensors (codes are bit-packed bytes); the shared basis is not counted here."""
        shapes: dict[str, tuple[int, ...]] = {}
        if self.n_clusters:
            shapes["codebook"] = (self.n_codebooks, self.n_clusters, self.segment_length)
            shapes["codes"] = (packed_nbytes(self.n_codes, self.code_bits),)
            if self.scale_groups:
                shapes["scales"] = (self.channels, self.scale_groups)
        if self.rank:
            shapes["lowrank_a"] = (self.out_features, self.rank)
            if self.shared_basis is None:
                shapes["lowrank_b"] = (self.rank, self.in_features)
        return shapes

    def stored_bytes(self, float_bytes: int) -> int:
        """Bytes this layer stores (without bias), floats at `float_bytes` each, codes packed."""
        total = 0
        for name, shape in self.tensor_shapes().items():
            numel = math.prod(shape)
            total += numel if name == "codes" else numel * float_bytes
        return total

    @property
    def shared_basis_shape(self) -> tuple[int, int] | None:
        """Shape of the input-side basis this layer shares with its group (None when it shares none)."""
        return None if self.shared_basis is None else (self.rank, self.in_features)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v != _DEFAULTS.get(k)}

    @classmethod
    def from_dict(cls, data: dict) -> LayerSpec:
        if not isinstance(data, dict):
            raise ValueError(f"a layer layout must be a dict of LayerSpec fields, got {type(data).__name__}")
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"LayerSpec got unknown fields {sorted(unknown)}; known: {[f.name for f in fields(cls)]}")
        return cls(**data)


_DEFAULTS = {f.name: f.default for f in fields(LayerSpec)}


def fitting_scale_group(group: int, length: int, segment: int = 1) -> int:
    """The largest scale group <= `group` that divides the channel `length` and holds whole segments.

    Channel lengths are often not multiples of the usual 128 (SmolLM2's 576 -> 96), so the size is rounded down.
    """
    for size in range(min(group, length), 0, -1):
        if length % size == 0 and size % segment == 0:
            return size
    return length


def rank_for_ratio(parameter_ratio: float, out_features: int, in_features: int) -> int:
    """The rank whose factors (out x r, r x in) keep `parameter_ratio` of an out x in matrix's parameters."""
    return math.floor(parameter_ratio * out_features * in_features / (out_features + in_features))
