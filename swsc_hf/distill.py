"""Distillation of the shared tables: after compression, fine-tune the codebooks (and per-group scales, and
optionally the layer norms) so the compressed model's next-token distribution matches the dense model's on
calibration text.

This is the weight-clustering paper's centroid fine-tuning with the dense model as the target instead of the text
(as AQLM's and VPTQ's end-to-end fine-tuning do): matching the teacher repairs compression error without adapting
the model to the calibration text's domain, and it keeps the stored size (codes, layouts and dtypes are unchanged).

The teacher is either a separate dense model or `DenseTeacher`: the dense modules compression replaced, kept and
swapped back in for the teacher's forward, so tuning after compression costs one dense model plus the compressed
one, not two dense models.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import TUNE_DTYPES
from .model_ops import swap_module
from .modules import SWSCDenseLinear
from .table_training import finish_training, prepare_for_training, scale_step_groups, set_cosine_step_sizes

logger = logging.getLogger(__name__)

Teacher = nn.Module | Callable[..., torch.Tensor]


class DenseTeacher:
    """The dense model that `model` was before compression, without a second copy of it.

    `modules` maps module names to the dense modules compression replaced (kept alive by this object); a call swaps
    them back in, runs `model` without gradients and swaps the compressed ones back, returning the logits. When the
    layer norms are tuned too, `modules` also holds frozen copies of them (`keep_norms`), since the model's own
    norms change during tuning while the teacher's must not.
    """

    def __init__(self, model: nn.Module, modules: dict[str, nn.Module], keeps_norms: bool = False) -> None:
        self.model = model
        self.modules = modules
        self.keeps_norms = keeps_norms

    @classmethod
    def before_compression(cls, model: nn.Module, names: list[str], keep_norms: bool = False) -> DenseTeacher:
        """The teacher for `model`'s modules `names`, taken before they are compressed: shallow copies that keep
        the dense tensors even where compression empties the original module (fused experts). `keep_norms` adds
        frozen copies of the layer norms (a few thousand values), for tuning that trains them."""
        modules = {name: _shallow_copy(model.get_submodule(name)) for name in names}
        if keep_norms:
            modules.update({name: _frozen_copy(module) for name, module in model.named_modules() if _is_norm(module)})
        return cls(model, modules, keeps_norms=keep_norms)

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, **kwargs) -> torch.Tensor:
        compressed = {name: self.model.get_submodule(name) for name in self.modules}
        try:
            for name, module in self.modules.items():
                swap_module(self.model, name, module)
            return self.model(ids, **kwargs).logits
        finally:
            for name, module in compressed.items():
                swap_module(self.model, name, module)


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A module object of its own that shares `module`'s tensors and children."""
    clone = copy.copy(module)
    clone._parameters, clone._buffers, clone._modules = (dict(module._parameters), dict(module._buffers),
                                                         dict(module._modules))
    return clone


def _frozen_copy(module: nn.Module) -> nn.Module:
    """A copy of a leaf module whose parameters are copies too: training the original leaves it as it was."""
    clone = _shallow_copy(module)
    clone._parameters = {name: None if param is None else nn.Parameter(param.detach().clone(), requires_grad=False)
                         for name, param in module._parameters.items()}
    return clone


def _is_norm(module: nn.Module) -> bool:
    """A layer norm with parameters of its own."""
    return "norm" in type(module).__name__.lower() and next(module.parameters(recurse=False), None) is not None


def norm_modules(model: nn.Module) -> list[nn.Module]:
    """The layer norms of `model`: a few thousand dense values that tuning may adjust."""
    return [module for module in model.modules() if _is_norm(module)]


def _in_input_dtype(module: nn.Module, args: tuple, output):
    """A norm trained in float32 inside a lower-precision model still hands on the model's dtype."""
    if args and torch.is_tensor(args[0]) and torch.is_tensor(output):
        return output.to(args[0].dtype)
    return output


def compute_dtype_for(name: str, device: torch.device) -> torch.dtype:
    """The dtype tuning multiplies in for a `tune_dtype` name ("float32", "bfloat16" or "auto") on `device`.

    "auto" is bfloat16 only where the hardware multiplies it natively (AVX-512 BF16 or AMX on CPU, 3.6x to 5.6x the
    float32 GEMM throughput measured on an AMD EPYC; bfloat16-capable CUDA GPUs): elsewhere it is emulated.
    """
    if name not in TUNE_DTYPES:
        raise ValueError(f"tune_dtype={name!r} is invalid; use one of {TUNE_DTYPES}")
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        probes = (getattr(torch.cpu, probe, None) for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
        return torch.bfloat16 if any(probe is not None and probe() for probe in probes) else torch.float32
    return torch.float32


@contextlib.contextmanager
def _frozen_heads_in(models: list, dtype: torch.dtype):
    """Within the block, the frozen dense output heads of `models` hold `dtype` copies of their weights, so autocast
    does not cast the largest matrix of a small model on every forward (SmolLM2's head, 28M weights, twice a step);
    the original parameters (tied to the input embeddings) are put back afterwards."""
    heads = {}
    if dtype != torch.float32:
        for model in models:
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            weight = getattr(head, "weight", None)
            if (type(head) in (nn.Linear, SWSCDenseLinear) and weight.dtype == torch.float32
                    and not weight.requires_grad and weight.device.type != "meta" and not hasattr(head, "_hf_hook")):
                heads[id(head)] = head, weight
    try:
        for head, weight in heads.values():
            head.weight = nn.Parameter(weight.detach().to(dtype), requires_grad=False)
        yield
    finally:
        for head, weight in heads.values():
            head.weight = weight


KL_CHUNK_VALUES = 2**20  # logits per chunk of `distillation_kl`: its float32 temporaries stay cache-sized


class _DistillationKL(torch.autograd.Function):
    """KL(teacher || student) per position, averaged, with its gradient (softmax(student) - softmax(teacher)) / rows
    written in the same pass over chunks of rows: no vocabulary-sized float32 temporaries, and backward is one
    multiply."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
        vocab = logits.shape[-1]
        student, teacher = logits.reshape(-1, vocab), target_logits.reshape(-1, vocab)
        rows = student.shape[0]
        grad = logits.new_empty(logits.shape)  # contiguous, in the logits' shape: backward returns it as it is
        grad_rows = grad.view(-1, vocab)
        total = torch.zeros((), dtype=torch.float64, device=logits.device)
        chunk = max(1, KL_CHUNK_VALUES // vocab)
        for start in range(0, rows, chunk):
            stop = min(start + chunk, rows)
            log_p = teacher[start:stop].float().log_softmax(-1)
            log_q = student[start:stop].float().log_softmax(-1)
            p = log_p.exp()
            total += (p * (log_p - log_q)).sum()
            grad_rows[start:stop] = log_q.exp_().sub_(p).div_(rows)
        ctx.save_for_backward(grad)
        return (total / rows).float()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None


def distillation_kl(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """The mean over positions of KL(softmax(target_logits) || softmax(logits)), differentiable in `logits` (the
    teacher's `target_logits` get no gradient); computed in float32 whatever the logits' dtype.

    Equals `F.kl_div(logits.log_softmax(-1), target_logits.log_softmax(-1), log_target=True,
    reduction="batchmean")` over the flattened positions, in one chunked pass: on SmolLM2's 49152-word vocabulary
    the unfused form's passes over 512 x 49152 floats took a quarter of a tuning step.
    """
    if logits.shape != target_logits.shape:
        raise ValueError(f"distillation_kl: logits {tuple(logits.shape)} and target_logits "
                         f"{tuple(target_logits.shape)} differ in shape; both must be (..., vocab)")
    return _DistillationKL.apply(logits, target_logits.detach())


def _logits(model: Teacher, ids: torch.Tensor, positions: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """`model`'s logits for `ids` (at `positions` only, when given), its matrix products autocast to `dtype`."""
    kwargs = {} if positions is None else {"logits_to_keep": positions}
    with torch.autocast(ids.device.type, dtype=dtype, enabled=dtype != torch.float32):
        out = model(ids, **kwargs)
    logits = out if torch.is_tensor(out) else out.logits
    if positions is not None and logits.shape[1] != positions.numel():  # a model without logits_to_keep
        logits = logits[:, positions]
    return logits


def distill_tables(
    model: nn.Module,
    teacher: Teacher,
    batches: list[torch.Tensor],
    steps: int = 64,
    lr: float = 1e-3,
    scales_lr: float | None = None,
    norms_lr: float | None = None,
    positions: int | None = None,
    time_budget: float | None = None,
    seed: int = 0,
    compute_dtype: str = "float32",
) -> list[float]:
    """Train `model`'s codebooks (and, with `scales_lr`, its scales; with `norms_lr`, its layer norms) to match
    `teacher`'s logits; returns the losses.

    Each step takes the next batch of `batches` (token ids), runs the teacher without gradients and minimises the
    per-token KL(teacher || model) with AdamW and a cosine schedule. `positions` scores that many random positions
    per sequence instead of all (the output head is most of a small model's cost). `time_budget` (seconds) ends
    tuning early, the schedule following elapsed time. Adam's steps are about `lr` in absolute size (the codebooks
    hold normalised values of order one); `scales_lr` is relative, a fraction of each layer's mean scale
    (`scale_step_groups`), since scales are weight magnitudes that differ between models. Tables are stored back in
    the checkpoint's table dtype at the end (`finish_training`), and the model's other parameters keep their dtypes,
    so save/reload reproduces the result. `compute_dtype` ("float32", "bfloat16" or "auto", see `compute_dtype_for`)
    is the precision of the teacher's and the model's matrix products; the tables, their gradients and the loss
    stay float32.
    """
    if steps < 1 or not batches:
        raise ValueError(f"distill_tables needs steps >= 1 and at least one batch, got steps={steps} and "
                         f"{len(batches)} batches")
    if norms_lr is not None and isinstance(teacher, DenseTeacher) and not teacher.keeps_norms:
        raise ValueError("distill_tables: norms_lr is set but the DenseTeacher shares the model's layer norms, so "
                         "the teacher would drift with them; build it with DenseTeacher.before_compression(model, "
                         "names, keep_norms=True)")
    if time_budget is not None and not time_budget > 0:
        raise ValueError(f"distill_tables: time_budget={time_budget!r} is invalid; use None or seconds > 0")
    dtypes = {name: param.dtype for name, param in model.named_parameters()}
    multiply_in = compute_dtype_for(compute_dtype, batches[0].device)
    logger.info("swsc_hf: tuning multiplies in %s (tune_dtype=%r)", multiply_in, compute_dtype)
    prepare_for_training(model, train_codebooks=True, train_scales=scales_lr is not None,
                         gradient_checkpointing=False, upcast_dense=False)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable and norms_lr is None:
        logger.warning("swsc_hf: nothing to distil (no codebooks or scales); tuning skipped")
        finish_training(model)
        return []
    groups = [{"params": [p for n, p in trainable if not n.endswith("scales")], "lr": lr}]
    if scales_lr is not None:
        groups += scale_step_groups([p for n, p in trainable if n.endswith("scales")], scales_lr)
    norms = norm_modules(model) if norms_lr is not None else []
    norm_params = [param for module in norms for param in module.parameters(recurse=False)]
    for param in norm_params:
        param.data = param.data.float()
        param.requires_grad_(True)
    if norm_params:
        groups.append({"params": norm_params, "lr": norms_lr})
    hooks = [module.register_forward_hook(_in_input_dtype) for module in norms]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    if isinstance(teacher, nn.Module):
        teacher.eval()
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    start = time.perf_counter()
    progress = tqdm(range(steps), desc="swsc_hf: distilling tables", unit="step")
    with _frozen_heads_in([model, teacher], multiply_in):
        for step in progress:
            elapsed = time.perf_counter() - start
            done = max(step / steps, elapsed / time_budget if time_budget else 0.0)
            if done >= 1:
                logger.info("swsc_hf: distillation stopped by its %.0f s time budget after %d of %d steps",
                            time_budget, step, steps)
                break
            set_cosine_step_sizes(optimizer, base_lrs, done)
            ids = batches[step % len(batches)]
            keep = None
            if positions is not None and positions < ids.shape[1]:
                keep = torch.randperm(ids.shape[1], generator=generator)[:positions].sort().values.to(ids.device)
            with torch.no_grad():
                target = _logits(teacher, ids, keep, multiply_in)
            loss = distillation_kl(_logits(model, ids, keep, multiply_in), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    progress.close()
    for hook in hooks:
        hook.remove()
    finish_training(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.requires_grad_(False)
            if name in dtypes and param.dtype != dtypes[name]:
                param.data = param.data.to(dtypes[name])
    if losses:
        logger.info("swsc_hf: distillation KL %.4f -> %.4f over %d steps", losses[0], losses[-1], len(losses))
    return losses
