"""`SWSCLinear`: a linear layer stored as shared terms (codebook + bit-packed codes + scales + low-rank factors);
`SWSCEmbedding`, embeddings read from a compressed head; `SWSCDenseLinear`, a linear a compressed model keeps dense."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .core.compress import CompressedWeight, int8_grid_codebook, to_weight
from .core.packing import pack_codes
from .core.spec import LayerSpec
from .kernels import (
    channel_tiles,
    codebook_matmul,
    dense_matmul,
    dequantize_channels,
    dequantize_weight_rows,
    unpacked_codes,
)


class KeepsTableDtype:
    """Mixin for modules holding compressed tables: dtype casts of the model (`.to(dtype)`, `.half()`, `.float()`,
    `.bfloat16()`) change the dense parts (biases, and what `dense_dtype` says dequantization returns) but leave every
    other float parameter (the tables) in the dtype it is stored in. The forward casts tables to the input's dtype, so
    a cast model runs in the new dtype without rounding its tables again (float16 tables cast to bfloat16 would lose
    three mantissa bits). Device moves apply to everything."""

    def _apply(self, fn, recurse: bool = True):
        kept = {name: p.dtype for name, p in self.named_parameters() if p.is_floating_point()
                and not name.endswith("bias")}
        result = super()._apply(fn, recurse)
        for name, param in self.named_parameters():
            if name in kept and param.dtype != kept[name]:
                param.data = param.data.to(kept[name])
        if isinstance(getattr(self, "dense_dtype", None), torch.dtype):  # what fn does to a dense tensor's dtype
            self.dense_dtype = fn(torch.empty(0, dtype=self.dense_dtype, device="cpu")).dtype
        return result


class SWSCLinear(KeepsTableDtype, nn.Module):
    """y = x W'^T + b with W' = scales * codebook[codes] + lowrank_a @ lowrank_b.

    Float tables are kept in `dtype` (the stored table dtype) and cast to the input's dtype in the forward; the
    bias keeps the model's dtype (`bias_dtype`).

    Not an `nn.Linear` on purpose: transformers re-initialises every nn.Linear weight and PEFT would treat it as
    dense. Codes stay bit-packed in memory (a frozen uint8 parameter, so offloading moves them like the tables);
    the forward hands them to `swsc_hf.kernels`, whose dispatch runs a look-up-table kernel that decodes codes in
    registers (few tokens) or rebuilds float32 tiles for a GEMM (many tokens), and the reference torch path where
    no kernel applies.
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
            tensor = torch.zeros(shape, dtype=torch.uint8 if name == "codes" else dtype, device=device)
            self.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
        bias_dtype = bias_dtype or dtype
        self.dense_dtype = bias_dtype or torch.get_default_dtype()
        self.bias = nn.Parameter(torch.zeros(spec.out_features, dtype=bias_dtype, device=device)) if bias else None
        self.relative_error: float | None = None

    # ---- construction --------------------------------------------------------------------------------------
    @staticmethod
    def stored_tensors(compressed: CompressedWeight, dtype: torch.dtype,
                       int8_codebook: bool = False) -> dict[str, torch.Tensor]:
        """The tensors a layer stores for `compressed`: floats in `dtype` (with `int8_codebook`, the codebook on its
        8-bit grid: `core.compress.int8_grid_codebook`), codes bit-packed."""
        spec = compressed.spec
        out: dict[str, torch.Tensor] = {}
        if spec.n_clusters:
            out["codebook"] = compressed.codebook.to(dtype)
            if int8_codebook:
                out["codebook"] = int8_grid_codebook(out["codebook"])
            out["codes"] = pack_codes(compressed.codes, spec.code_bits)
            if compressed.scales is not None:
                out["scales"] = compressed.scales.to(dtype)
        if spec.rank:
            out["lowrank_a"] = compressed.lowrank_a.to(dtype).contiguous()
            if spec.shared_basis is None:
                out["lowrank_b"] = compressed.lowrank_b.to(dtype).contiguous()
        return out

    def load_compressed(self, compressed: CompressedWeight, dtype: torch.dtype, int8_codebook: bool = False) -> None:
        """Install fitted terms (replacing the placeholders), as `stored_tensors` gives them."""
        for name, tensor in self.stored_tensors(compressed, dtype, int8_codebook).items():
            setattr(self, name, nn.Parameter(tensor, requires_grad=False))

    def __setattr__(self, name: str, value) -> None:
        # `codes` is a frozen uint8 parameter (not a buffer) so that disk/CPU offload moves it with the tables by
        # default (accelerate keeps buffers resident unless `offload_buffers=True`); a plain tensor assigned to it is
        # wrapped, as a buffer assignment would have been accepted.
        if name == "codes" and isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
            value = nn.Parameter(value, requires_grad=False)
        super().__setattr__(name, value)

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
        return unpacked_codes(self.codes, self.spec, start, stop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        out = None
        if spec.n_clusters:
            # the tensors read from the parameter dict at once: a decode step calls ~200 of these layers, and
            # nn.Module's attribute fallback costs about a microsecond per name (an exception where scales are absent)
            params = self._parameters
            out = codebook_matmul(x, params["codes"], params["codebook"], params.get("scales"), spec)
        if spec.rank:
            low = F.linear(F.linear(x, self.basis.to(x.dtype)), self.lowrank_a.to(x.dtype))
            out = low if out is None else out + low
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out

    @torch.no_grad()
    def dequantize(self) -> torch.Tensor:
        """The dense (out x in) weight this layer represents, in the model's dtype."""
        spec = self.spec
        device = self.codes.device if spec.n_clusters else self.lowrank_a.device
        weight = torch.zeros(spec.out_features, spec.in_features, dtype=torch.float32, device=device)
        if spec.n_clusters:
            scales = getattr(self, "scales", None)
            channels = torch.cat([dequantize_channels(self.codes, self.codebook, scales, spec, start, stop)
                                  for start, stop in channel_tiles(spec)])
            weight += to_weight(channels, spec)
        if spec.rank:
            weight += self.lowrank_a.float() @ self.basis.float().to(weight.device)
        return weight.to(self.dense_dtype)

    def weight_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows `rows` (1-D output indices) of the dense weight, in the model's dtype, decoded from only their
        codes: the look-up of an embedding tied to this layer (`SWSCEmbedding`)."""
        spec = self.spec
        rows = rows.to(self.codes.device if spec.n_clusters else self.lowrank_a.device)
        out = None
        if spec.n_clusters:
            out = dequantize_weight_rows(self.codes, self.codebook, getattr(self, "scales", None), spec, rows)
        if spec.rank:
            low = self.lowrank_a[rows].float() @ self.basis.float().to(rows.device)
            out = low if out is None else out + low
        return out.to(self.dense_dtype)

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


class SWSCEmbedding(nn.Module):
    """Input embeddings read from the compressed output head they are tied to (`SWSCConfig.embedding_from_head`):
    token t's embedding is row t of the head's weight, decoded from its codes on look-up, so the tied matrix is
    stored once, compressed, as a GGUF file stores one quantized token_embd for both.

    `replaced` is the nn.Embedding this stands for (its padding index and Gemma's `scalar_embed_scale` are kept);
    its dense weight is dropped. The head is referenced, not registered as a child: its tensors are saved, moved and
    offloaded under the head's name only.
    """

    def __init__(self, head: SWSCLinear, replaced: nn.Embedding) -> None:
        super().__init__()
        if "weight" in replaced._parameters:
            del replaced.weight
        self.__dict__["head"] = head
        self.__dict__["replaced"] = replaced
        self.num_embeddings = head.out_features
        self.embedding_dim = head.in_features
        self.padding_idx = replaced.padding_idx
        self.embed_scale: float | None = getattr(replaced, "scalar_embed_scale", None)
        # Empty, in the model's dtype: transformers takes `model.dtype` (and a saved config's dtype) from the first
        # float parameter, which would otherwise be a table of the first compressed layer.
        self.dtype_marker = nn.Parameter(torch.empty(0, dtype=head.dense_dtype, device=next(head.parameters()).device),
                                         requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        head = self.head
        # accelerate's offload hook brings the head's tensors in, as for the head's own forward, and out again
        hook = getattr(head, "_hf_hook", None)
        if hook is not None:
            (input_ids,), _ = hook.pre_forward(head, input_ids)
        rows = head.weight_rows(input_ids.reshape(-1)).reshape(*input_ids.shape, self.embedding_dim)
        if hook is not None:
            rows = hook.post_forward(head, rows)
        if self.embed_scale is not None:  # rounded to the rows' dtype first, as Gemma's embedding does
            rows = rows * rows.new_tensor(self.embed_scale)
        return rows

    def dense_embedding(self, weight: nn.Parameter) -> nn.Embedding:
        """The embedding this replaced, holding `weight` (the dense head's, so the two are tied again)."""
        embedding = self.replaced
        embedding.weight = weight
        if self.embed_scale is not None and getattr(embedding, "embed_scale", None) is not None:
            embedding.embed_scale = torch.tensor(self.embed_scale, device=weight.device)  # a meta buffer on load
        return embedding

    def extra_repr(self) -> str:
        scale = "" if self.embed_scale is None else f", embed_scale={self.embed_scale:g}"
        return f"{self.num_embeddings}, {self.embedding_dim}, read from the compressed output head{scale}"


class SWSCDenseLinear(nn.Linear):
    """An nn.Linear that a compressed model keeps dense (its output head, unless `head_bits` compresses it), whose
    decode-sized CPU calls (float32 or bfloat16) run swsc_hf's dense GEMV (`swsc_hf.kernels.dense_matmul`):
    it reads the weight at memory speed, where torch's sgemv read SmolLM2's 113 MB head at 11 GB/s of the 27-33 a
    Zen 4 EPYC gives (docs/design.md). Same parameters, state dict and results (within rounding) as nn.Linear; other
    calls (prompts, training, other dtypes and devices) run `F.linear`. `model_ops.use_dense_gemv` makes a model's
    head one in place."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return dense_matmul(input, self.weight, self.bias)
