"""Baselines the benchmarks compare against, applied in place to an already-loaded model.

Every function returns the average stored bits per compressed weight (every byte counted, float metadata at 16
bits as in an fp16 checkpoint) over the same set of layers swsc_hf compresses: every nn.Linear except lm_head.
"""

from __future__ import annotations

import os
import tempfile

import torch
from torch import nn
from tqdm.auto import tqdm

from swsc_hf.model_ops import dense_linear, swap_module
from swsc_hf.model_ops import target_linears as swsc_targets

SKIP = ("lm_head",)


def target_linears(model: nn.Module, skip: tuple[str, ...] = SKIP) -> list[tuple[str, nn.Linear]]:
    """The nn.Linear layers a baseline quantizes: swsc_hf's own choice with `skip` kept dense (all but lm_head by
    default; embeddings are not Linear)."""
    return swsc_targets(model, list(skip))


@torch.no_grad()
def rtn_quantize_(model: nn.Module, bits: int, group_size: int | None, skip: tuple[str, ...] = SKIP) -> float:
    """Asymmetric per-group round-to-nearest of every target nn.Linear (min/max grid, fp16 scale and minimum).

    Groups run along each row (input dimension) and never straddle rows: where `group_size` does not divide the
    row (SmolLM2's 576-wide rows with 128), the row's last group is shorter (576 = 4 x 128 + 64) and costs a full
    scale and minimum; `group_size=None` is one group per row. Returns bits + 32 * groups / weights, counted exactly
    over all layers.
    """
    stored_bits, weights = 0, 0
    for _, module in tqdm(target_linears(model, skip), desc=f"RTN {bits}-bit g{group_size}", unit="layer"):
        weight = module.weight.float()
        out = torch.empty_like(weight)
        step = group_size or weight.shape[1]
        for start in range(0, weight.shape[1], step):
            block = weight[:, start : start + step]
            low, high = block.amin(dim=1, keepdim=True), block.amax(dim=1, keepdim=True)
            scale = ((high - low) / (2**bits - 1)).clamp_min(1e-12).half().float()
            low = low.half().float()
            q = torch.clamp(torch.round((block - low) / scale), 0, 2**bits - 1)
            out[:, start : start + step] = q * scale + low
            stored_bits += 32 * weight.shape[0]
        module.weight.copy_(out.to(module.weight.dtype))
        stored_bits += bits * weight.numel()
        weights += weight.numel()
    return stored_bits / weights


def _float_bits(tensor: torch.Tensor) -> int:
    """Bits a tensor takes when stored: float tensors at 16 bits per element, integer ones as they are."""
    return tensor.numel() * (16 if tensor.is_floating_point() else 8 * tensor.element_size())


@torch.no_grad()
def hqq_quantize_(model: nn.Module, bits: int, group_size: int, skip: tuple[str, ...] = SKIP) -> float:
    """HQQ (the `hqq` package): every target nn.Linear becomes an `HQQLinear` (PyTorch backend, float32 compute).

    HQQ's default quantization config: asymmetric, groups of `group_size` along the input dimension, half-quadratic
    optimized scale and zero. Its scale and zero are rounded to fp16 (what an fp16 HQQ model stores). Returns the
    stored bits: the bit-packed codes as HQQ packs them (3-bit packs 10 codes per int32 word: 3.2 bits) plus a fp16
    scale and zero per group.
    """
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    config = BaseQuantizeConfig(nbits=bits, group_size=group_size)
    stored_bits, weights = 0, 0
    for name, module in tqdm(target_linears(model, skip), desc=f"HQQ {bits}-bit g{group_size}", unit="layer"):
        dtype, count = module.weight.dtype, module.weight.numel()
        layer = HQQLinear(module, config, compute_dtype=dtype, device=str(module.weight.device))  # drops the weight
        for key in ("scale", "zero"):
            layer.meta[key] = layer.meta[key].half().to(dtype)
        stored_bits += _float_bits(layer.W_q) + _float_bits(layer.meta["scale"]) + _float_bits(layer.meta["zero"])
        weights += count
        swap_module(model, name, layer)
    return stored_bits / weights


@torch.no_grad()
def quanto_quantize_(model: nn.Module, bits: int, dequantize: bool = False, skip: tuple[str, ...] = SKIP) -> float:
    """optimum-quanto weight-only qint4 / qint8 (quanto's defaults: int4 in groups of up to 128 that divide the row,
    with scale and shift; int8 per output channel with a scale), frozen to its packed integer form.

    With `dequantize`, each quantized layer is then replaced by an nn.Linear holding its dequantized weight: the
    same function, without quanto's CPU int4 forward (about 30x slower than dense here). Returns the bits of every
    tensor the quantized layers hold (codes as packed, float scales/shifts at 16 bits).
    """
    from optimum.quanto import freeze, qint4, qint8, quantize

    names = [name for name, _ in target_linears(model, skip)]
    quantize(model, weights={4: qint4, 8: qint8}[bits], include=names)
    freeze(model)
    stored_bits, weights = 0, 0
    for name in names:
        module = model.get_submodule(name)
        stored_bits += sum(_float_bits(t) for key, t in _flat_state(module).items() if key.startswith("weight"))
        weights += module.in_features * module.out_features
        if dequantize:
            weight = module.weight.dequantize()
            swap_module(model, name, dense_linear(weight, module.bias))
    return stored_bits / weights


def _flat_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's own tensors, with tensor subclasses (quanto, torchao) flattened into their plain parts."""
    out: dict[str, torch.Tensor] = {}
    stack = [(key, value) for key, value in module.state_dict(keep_vars=True).items()]
    while stack:
        key, value = stack.pop()
        if hasattr(value, "__tensor_flatten__"):
            inner, _ = value.__tensor_flatten__()
            stack += [(f"{key}.{name}", getattr(value, name)) for name in inner]
        elif isinstance(value, torch.Tensor):
            out[key] = value
    return out


@torch.no_grad()
def torchao_quantize_(model: nn.Module, bits: int, group_size: int | None, skip: tuple[str, ...] = SKIP) -> float:
    """torchao weight-only quantization. 8 bits: `Int8WeightOnlyConfig` (per output channel). Other bits:
    `IntxWeightOnlyConfig` (symmetric, per group), the int4 path that runs on CPU here.

    Returns the stored bits of the packed format (bits per code, plus a fp16 scale and an int8 zero point per
    group): on CPU torchao holds intx codes unpacked, one int8 per weight, so its memory is higher than this.
    """
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    targets = {id(module) for _, module in target_linears(model, skip)}
    if bits == 8:
        config = Int8WeightOnlyConfig()
    else:
        config = IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=PerGroup(group_size))
    layers = [module for _, module in target_linears(model, skip)]
    weights = sum(module.weight.numel() for module in layers)
    groups = sum(module.weight.numel() // (group_size or module.in_features) for module in layers)
    quantize_(model, config, filter_fn=lambda module, _fqn: id(module) in targets)
    zero_point_bits = 0 if bits == 8 else 8
    return (bits * weights + (16 + zero_point_bits) * groups) / weights


@torch.no_grad()
def gptq_quantize_(model: nn.Module, tokenizer, bits: int, group_size: int, calibration: list[torch.Tensor]) -> float:
    """GPTQ through GPTQModel on CPU (asymmetric, groups along the input dimension, no act-order), as fake-quant.

    GPTQModel loads models from a folder, so the dense model and tokenizer are saved to a temporary one; `calibration`
    holds the token windows (1 x seq_len) swsc_hf's calibrated compression uses. GPTQ's own reconstruction of
    each layer (the weight it computes from its codes, scales and zeros before packing) is copied into `model`:
    GPTQModel 7.6's packed CPU layer (TorchLinear) does not reproduce that weight for this float32 model (relative
    error 0.14 against it on layer 0), so the packed model is not used. Returns the bits of the GPTQ checkpoint
    format: packed codes, a fp16 scale and a `bits`-bit zero per group and output channel, an int32 g_idx per input.
    """
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # its default (cores / 2) fails on a 2-core machine
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.looper.gptq_processor import GPTQProcessor

    reconstructed: dict[str, torch.Tensor] = {}
    original = GPTQProcessor.process

    def process(self, module, *args, **kwargs):
        out = original(self, module, *args, **kwargs)
        reconstructed[module.full_name] = module.weight.data.detach().to("cpu", copy=True)
        return out

    GPTQProcessor.process = process
    cwd = os.getcwd()
    try:
        with tempfile.TemporaryDirectory() as folder:
            os.chdir(folder)  # GPTQModel writes its logs to ./logs
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            config = QuantizeConfig(bits=bits, group_size=group_size, sym=False, desc_act=False, device="cpu",
                                    offload_to_disk=False)
            wrapped = GPTQModel.load(folder, config, dtype=model.dtype)
            rows = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in calibration]
            wrapped.quantize(rows, batch_size=1)
            del wrapped
    finally:
        os.chdir(cwd)
        GPTQProcessor.process = original
    stored_bits, weights = 0, 0
    for name, module in target_linears(model):
        module.weight.copy_(reconstructed.pop(name).to(module.weight.dtype))
        groups = module.out_features * -(-module.in_features // group_size)
        stored_bits += bits * module.weight.numel() + (16 + bits) * groups + 32 * module.in_features
        weights += module.weight.numel()
    if reconstructed:
        raise RuntimeError(f"GPTQModel quantized layers the benchmark does not target: {sorted(reconstructed)}")
    return stored_bits / weights
