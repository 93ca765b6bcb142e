"""Export to OpenVINO IR that keeps every compressed layer's learned codebook exactly.

`export_openvino` traces the model (with a KV cache as explicit inputs and outputs) through `openvino.convert_model`
with a placeholder in place of each `SWSCLinear`'s weight, then replaces each placeholder constant by a
decompression subgraph of the layer's own stored terms, in NNCF's codebook pattern:

    codes (u4/u8/u16 constant, one index per segment) -> Gather from the layer's codebook constant (its stored
    dtype) -> Convert f32 -> Multiply by the per-group scales -> Reshape (-> Transpose for cluster_dim="input")

and adds the low-rank term on the activations (two more MatMuls) where the layer has one. The weight is computed in
float32 from the stored float16 tables, as swsc_hf's own kernels do, so the exported model is exact (NNCF multiplies
in float16, which would round every weight once more). Every `LayerSpec` is expressible: scalar and vector
segments, several codebooks per matrix, both cluster dims, shared bases, biases. Compressed mixture-of-experts
blocks (`SWSCExperts`) are refused.

`OpenVINOCausalLM` runs an exported folder: logits for a batch of token ids, and greedy generation on the KV cache.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .atomic_save import atomic_directory
from .experts import SWSCExperts
from .modules import SWSCLinear

logger = logging.getLogger(__name__)

MODEL_FILE = "openvino_model.xml"
LAYOUT_FILE = "swsc_openvino.json"
_INSTALL = "pip install openvino (tested with openvino==2026.4.1)"


def _openvino():
    try:
        import openvino
        import openvino.opset13
    except ImportError as err:
        raise ImportError(f"exporting to or running OpenVINO needs the openvino package: {_INSTALL}") from err
    return openvino


class _Placeholder(nn.Module):
    """Stands in for an `SWSCLinear` while tracing: a linear layer whose weight (replaced in the IR) is filled with
    `marker`, distinct per layer (the converter merges equal constants), and the layer's bias."""

    def __init__(self, layer: SWSCLinear, marker: int) -> None:
        super().__init__()
        dtype = layer.dense_dtype
        self.weight = nn.Parameter(torch.full((layer.out_features, layer.in_features), float(marker), dtype=dtype),
                                   requires_grad=False)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


class _WithCache(nn.Module):
    """The model as a function of (input_ids, attention_mask, position_ids, past keys and values per layer) returning
    (logits, present keys and values per layer): the KV cache as plain tensors, which tracing can follow."""

    def __init__(self, model: nn.Module, layers: int) -> None:
        super().__init__()
        self.model = model
        self.layers = layers
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.layers):
            layer = cache.layers[i]
            layer.lazy_initialization(past[2 * i], past[2 * i + 1])
            layer.keys, layer.values = past[2 * i], past[2 * i + 1]
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **{self.cache_arg: cache})
        present = _cache_of(out)
        return (out.logits, *[t for layer in present.layers[: self.layers] for t in (layer.keys, layer.values)])


def _cache_of(output):
    """The cache a forward returned (`cache` in newer transformers, `past_key_values` before)."""
    cache = getattr(output, "cache", None)
    return output.past_key_values if cache is None else cache


def _ov_constant(ov, tensor: torch.Tensor):
    """A constant holding `tensor` in its own dtype (bfloat16 bit for bit)."""
    opset = ov.opset13
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        bits = tensor.view(torch.int16).numpy().view(np.uint16)
        return opset.constant(ov.Tensor(bits, list(bits.shape), ov.Type.bf16))
    if tensor.dtype not in (torch.float16, torch.float32):
        tensor = tensor.float()
    return opset.constant(tensor.numpy())


def _codes_constant(ov, layer: SWSCLinear, name: str):
    """The layer's codes, one index per segment, as (channels, segments) u4 / u8 / u16, converted to what Gather
    takes (u8, as NNCF does for u4; i32 for u16)."""
    opset = ov.opset13
    codes = layer.unpacked_codes()
    bits = layer.spec.code_bits
    if bits <= 4:
        const = opset.constant(codes.to(torch.uint8).numpy(), dtype=ov.Type.u4, name=f"{name}/codes")
        return opset.convert(const, ov.Type.u8)
    if bits <= 8:
        return opset.constant(codes.to(torch.uint8).numpy(), dtype=ov.Type.u8, name=f"{name}/codes")
    const = opset.constant(codes.to(torch.int32).numpy().astype(np.uint16), dtype=ov.Type.u16, name=f"{name}/codes")
    return opset.convert(const, ov.Type.i32)


def _codebook_weight(ov, layer: SWSCLinear, name: str):
    """The (out, in) float32 codebook term of `layer` as a decompression subgraph of its stored tables."""
    opset = ov.opset13
    spec = layer.spec
    channels, length = spec.channels, spec.channel_length
    codes = _codes_constant(ov, layer, name)
    codebook = _ov_constant(ov, layer.codebook)  # (books, K, v)
    codebook.set_friendly_name(f"{name}/codebook")
    if spec.n_codebooks == 1:
        book = opset.reshape(codebook, [spec.n_clusters, spec.segment_length], False)
        gathered = opset.gather(book, codes, 0, name=f"{name}/codebook_gather")  # (C, S, v)
    else:  # channel c uses book c // rows: pad the channels to whole books, gather per book, drop the padding
        rows, books = spec.channels_per_codebook, spec.n_codebooks
        padded = books * rows
        if padded != channels:
            pad = opset.constant(np.zeros((padded - channels, spec.segments_per_channel),
                                          dtype=codes.get_element_type().to_dtype()))
            codes = opset.concat([codes, pad], 0)
        codes = opset.reshape(codes, [books, rows * spec.segments_per_channel], False)
        gathered = opset.gather(codebook, codes, 1, batch_dims=1, name=f"{name}/codebook_gather")
        gathered = opset.reshape(gathered, [padded, length], False)
        if padded != channels:
            gathered = opset.slice(gathered, np.array([0]), np.array([channels]), np.array([1]), np.array([0]))
    weight = opset.convert(gathered, ov.Type.f32)
    if spec.scale_groups:
        scales = opset.convert(_ov_constant(ov, layer.scales), ov.Type.f32)
        scales.set_friendly_name(f"{name}/scale")
        scales = opset.reshape(scales, [channels, spec.scale_groups, 1], False)
        weight = opset.reshape(weight, [channels, spec.scale_groups, spec.scale_group_size], False)
        weight = opset.multiply(weight, scales, name=f"{name}/fq_weights")
    weight = opset.reshape(weight, [channels, length], False)
    if spec.cluster_dim == "input":
        weight = opset.transpose(weight, np.array([1, 0]))
    return weight


def _f32(ov, tensor: torch.Tensor, name: str, cache: dict):
    key = (id(tensor), name)
    if key not in cache:
        const = _ov_constant(ov, tensor)
        const.set_friendly_name(name)
        cache[key] = ov.opset13.convert(const, ov.Type.f32)
    return cache[key]


def _consumers(output) -> list:
    return list(output.get_target_inputs())


def _install_layer(ov, ir, constants: dict, name: str, layer: SWSCLinear, shared: dict) -> None:
    """Replace the placeholder weight of `name` in `ir` by the layer's decompression subgraph (+ low-rank term)."""
    opset = ov.opset13
    const = constants.get(f"self.model.{name}.weight")
    if const is None:
        raise RuntimeError(f"swsc_hf: the traced OpenVINO graph has no weight constant for compressed layer {name!r}; "
                           "this architecture's forward does not call the layer as a plain linear")
    matmuls = []
    pending = [const.output(0)]
    while pending:  # follow Converts the frontend may put between the constant and its MatMul
        for target in _consumers(pending.pop()):
            node = target.get_node()
            if node.get_type_name() == "Convert":
                pending.append(node.output(0))
            elif node.get_type_name() == "MatMul" and target.get_index() == 1 and node.get_transpose_b():
                matmuls.append(node)
            else:
                raise RuntimeError(f"swsc_hf: the weight of {name!r} feeds {node.get_type_name()} in the traced "
                                   "OpenVINO graph, not a MatMul; cannot export this layer")
    spec = layer.spec
    if spec.n_clusters:
        weight = _codebook_weight(ov, layer, name)
    else:  # low-rank only: the MatMul's weight is zero; drop it below
        weight = None
    for matmul in matmuls:
        x = matmul.input_value(0)
        term = None
        if weight is not None:
            target_type = matmul.input_value(1).get_element_type()
            w = weight if target_type == ov.Type.f32 else opset.convert(weight, target_type)
            matmul.input(1).replace_source_output(w.output(0))
            term = matmul
        if spec.rank:
            basis = layer.basis
            b = _f32(ov, basis, f"{name}/lowrank_b" if spec.shared_basis is None
                     else f"shared_basis/{spec.shared_basis}", shared)
            a = _f32(ov, layer.lowrank_a, f"{name}/lowrank_a", shared)
            xf = x if x.get_element_type() == ov.Type.f32 else opset.convert(x, ov.Type.f32)
            low = opset.matmul(opset.matmul(xf, b, False, True), a, False, True, name=f"{name}/lowrank")
            if x.get_element_type() != ov.Type.f32:
                low = opset.convert(low, x.get_element_type())
            targets = _consumers(matmul.output(0))
            new = low if term is None else opset.add(matmul, low)
            for target in targets:
                target.replace_source_output(new.output(0))


def export_openvino(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer=None,
    *,
    overwrite: bool = False,
    compress_to_fp16: bool = False,
) -> Path:
    """Export a (compressed) causal LM to OpenVINO IR in `out_dir`, keeping every `SWSCLinear` as its codes,
    codebook, scales and low-rank factors; returns the folder.

    The IR takes input_ids, attention_mask, position_ids and the past keys/values of every layer and returns logits
    and the present keys/values (run it with `OpenVINOCausalLM`). Dense parts (embeddings, norms, layers left
    dense) stay float32 unless `compress_to_fp16` (smaller IR, dense parts rounded to float16: no longer exact).
    `out_dir` must be new or empty unless `overwrite` (files the export does not write are kept). The config and
    `tokenizer` (if given) are saved beside the IR. Needs `pip install openvino`.
    """
    ov = _openvino()
    out = Path(out_dir).resolve()
    if os.path.lexists(out) and not out.is_dir():
        raise ValueError(f"the output path {out} exists and is not a folder; pick a new or empty folder")
    if out.is_dir() and not overwrite and any(out.iterdir()):
        raise ValueError(f"the output folder {out} is not empty; pick a new or empty folder, or pass overwrite=True "
                         "(files the export does not write are kept)")
    experts = [name for name, m in model.named_modules() if isinstance(m, SWSCExperts)]
    if experts:
        raise ValueError(f"export_openvino does not export compressed mixture-of-experts blocks ({experts[0]!r} and "
                         f"{len(experts) - 1} more): their experts are not called as plain linear layers; dequantize "
                         "the model (dequantize_model) for a dense export")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, SWSCLinear)}
    if not layers:
        logger.warning("swsc_hf: the model has no compressed layers; exporting it dense to OpenVINO")
    device = next(p.device for p in model.parameters())
    if any(p.device.type == "meta" for p in model.parameters()) or device.type != "cpu":
        raise ValueError("export_openvino needs the whole model on the CPU (no meta or offloaded weights); "
                         "load it with device_map='cpu'")
    was_training = model.training
    model.eval()
    with torch.no_grad():
        probe = model(input_ids=torch.zeros(1, 2, dtype=torch.long), use_cache=True)
    cache = _cache_of(probe)
    n_layers = len(cache.layers)
    past = [t for layer in cache.layers for t in (layer.keys.detach().clone(), layer.values.detach().clone())]
    placeholders = {}
    try:
        for marker, (name, layer) in enumerate(layers.items(), 1):
            parent, _, child = name.rpartition(".")
            placeholders[name] = _Placeholder(layer, marker)
            setattr(model.get_submodule(parent), child, placeholders[name])
        wrapper = _WithCache(model, n_layers).eval()
        example = (torch.ones(1, 3, dtype=torch.long), torch.ones(1, 5, dtype=torch.long),
                   torch.arange(2, 5)[None], *past)
        with torch.no_grad():
            ir = ov.convert_model(wrapper, example_input=example)
    finally:
        for name, layer in layers.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
        model.train(was_training)
    del placeholders
    constants = {op.get_friendly_name(): op for op in ir.get_ordered_ops() if op.get_type_name() == "Constant"}
    shared: dict = {}
    for name, layer in layers.items():
        _install_layer(ov, ir, constants, name, layer, shared)
    del constants
    ir.validate_nodes_and_infer_types()
    names = ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kind}" for i in range(n_layers) for kind in ("key", "value")]
    for port, port_name in zip(ir.inputs, names, strict=True):
        port.get_tensor().set_names({port_name})
    out_names = ["logits"] + [f"present.{i}.{kind}" for i in range(n_layers) for kind in ("key", "value")]
    for port, port_name in zip(ir.outputs, out_names, strict=True):
        port.get_tensor().set_names({port_name})
    kv_shapes = [list(t.shape[1:2]) + list(t.shape[3:]) for t in past]
    layout = dict(format="swsc_hf-openvino-1", layers=n_layers, kv_heads_head_dim=kv_shapes,
                  compressed_layers={name: layer.spec.to_dict() for name, layer in layers.items()},
                  compress_to_fp16=compress_to_fp16)
    with atomic_directory(out, keep_other_files=True) as tmp:
        ov.save_model(ir, str(tmp / MODEL_FILE), compress_to_fp16=compress_to_fp16)
        (tmp / LAYOUT_FILE).write_text(json.dumps(layout, indent=1), encoding="utf-8")
        if getattr(model, "config", None) is not None:
            model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    logger.info("swsc_hf: exported %d compressed layers to %s", len(layers), out / MODEL_FILE)
    return out


def _make_stateful(ov, ir, kv_shapes: list[list[int]]) -> None:
    """Keep the KV cache inside the compiled model (OpenVINO's ReadValue/Assign state, as optimum-intel's IRs do):
    no cache crosses the API per step. Each state starts as (batch of input_ids, heads, 0, head_dim) zeros."""
    from openvino._offline_transformations import apply_make_stateful_transformation

    opset = ov.opset13
    pairs = {f"past_key_values.{i}.{kind}": f"present.{i}.{kind}"
             for i in range(len(kv_shapes) // 2) for kind in ("key", "value")}
    apply_make_stateful_transformation(ir, pairs)
    batch = opset.gather(opset.shape_of(ir.input("input_ids")), opset.constant([0]), opset.constant(0))
    index = {f"{past}{present}": n for n, (past, present) in enumerate(pairs.items())}
    for op in ir.get_ops():
        if op.get_type_name() == "ReadValue":
            heads, dim = kv_shapes[index[op.get_variable_id()]]
            shape = opset.concat([batch, opset.constant([heads]), opset.constant([0]), opset.constant([dim])], 0)
            op.set_arguments([opset.broadcast(opset.constant(np.float32(0)), shape)])
    ir.validate_nodes_and_infer_types()


class OpenVINOCausalLM:
    """Runs a folder written by `export_openvino` on an OpenVINO device, with the KV cache kept inside the compiled
    model: `logits(input_ids)`, greedy `generate(input_ids, max_new_tokens)`, and `reset()` / `step(input_ids)` to
    feed a sequence piece by piece.

    `precision` is the CPU plugin's inference precision; "f32" (default) reproduces the torch model. `threads` = 0
    lets OpenVINO choose. Batches must be unpadded (every sequence of a batch the same length).
    """

    def __init__(self, folder: str | os.PathLike, device: str = "CPU", *, precision: str = "f32",
                 threads: int = 0) -> None:
        ov = _openvino()
        folder = Path(folder)
        layout_path = folder / LAYOUT_FILE
        if not layout_path.is_file():
            raise FileNotFoundError(f"{folder} holds no {LAYOUT_FILE}: not a folder written by export_openvino")
        self.layout = json.loads(layout_path.read_text(encoding="utf-8"))
        self.core = ov.Core()
        ir = self.core.read_model(str(folder / MODEL_FILE))
        _make_stateful(ov, ir, self.layout["kv_heads_head_dim"])
        config: dict = {"INFERENCE_PRECISION_HINT": precision} if device == "CPU" else {}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = self.core.compile_model(ir, device, config)
        self.request = self.compiled.create_infer_request()
        self.seen = 0

    def reset(self) -> None:
        """Start a new sequence (empty the cache)."""
        self.request.reset_state()
        self.seen = 0

    def step(self, input_ids) -> np.ndarray:
        """Logits (batch, new, vocab) of `input_ids` (batch, new) appended to the cached sequence; extends the
        cache."""
        ids = np.asarray(input_ids.numpy() if isinstance(input_ids, torch.Tensor) else input_ids, dtype=np.int64)
        batch, new = ids.shape
        positions = np.broadcast_to(np.arange(self.seen, self.seen + new, dtype=np.int64), (batch, new)).copy()
        results = self.request.infer([ids, np.ones((batch, self.seen + new), dtype=np.int64), positions])
        self.seen += new
        return results[self.compiled.outputs[0]]

    def logits(self, input_ids) -> torch.Tensor:
        """Logits (batch, seq, vocab) float32 of a batch of token ids, as a new sequence."""
        self.reset()
        return torch.from_numpy(np.array(self.step(input_ids), dtype=np.float32))

    def generate(self, input_ids, max_new_tokens: int) -> torch.Tensor:
        """Greedy continuation of a (batch, seq) prompt: (batch, seq + max_new_tokens) token ids."""
        ids = np.asarray(input_ids.numpy() if isinstance(input_ids, torch.Tensor) else input_ids, dtype=np.int64)
        self.reset()
        logits = self.step(ids)
        tokens = [ids]
        for i in range(max_new_tokens):
            token = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
            tokens.append(token)
            if i + 1 < max_new_tokens:
                logits = self.step(token)
        return torch.from_numpy(np.concatenate(tokens, axis=1))
