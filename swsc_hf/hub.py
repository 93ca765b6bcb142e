"""Model cards for swsc_hf models, and the hook that makes transformers' own `push_to_hub` upload them.

`PushToHubMixin.push_to_hub` (transformers 5.23) saves the model into a temporary folder, then overwrites its
README.md with `create_and_tag_model_card` (the repo's current card, or a generic template), then calls
`self._upload_modified_files(folder, repo_id, ...)`; `save_pretrained(..., push_to_hub=True)` ends in the same call.
So a README written by `save_pretrained` never reaches the Hub, and the only per-model point between "card written"
and "files uploaded" is `_upload_modified_files`. `install_model_card` overrides it on the model instance (not the
class, so other models are untouched): the override regenerates README.md from the model as it is at upload time,
keeps the metadata of the card transformers put there (the repo's current card or the template, with the `tags=`
of push_to_hub), and calls the class method. The card's text is regenerated on every push: edits made on the Hub
to the text (not the metadata) of an swsc_hf card are replaced.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import PreTrainedModel

from .report import compression_report

logger = logging.getLogger(__name__)

TAGS = ["swsc_hf", "compression"]
CARD_KWARGS_ATTR = "_swsc_model_card_kwargs"
_UPLOAD_HOOK = "_upload_modified_files"

METHOD_DESCRIPTIONS = {
    "swsc": (
        "**SWSC** (shared weights for similar channels, arXiv 2501.08631): the channels of every compressed weight "
        "matrix are grouped by K-Means, each channel stores only the label of its cluster's representative, and the "
        "approximation error W - W' is compensated by a low-rank term taken from its top singular vectors."
    ),
    "weight_clustering": (
        "**Weight clustering** (arXiv 2603.17917): every compressed weight matrix keeps only K shared values found "
        "by K-Means, and each weight stores the index of its value; an optional affine correction w' = a*w + b keeps "
        "each matrix's mean and spread."
    ),
    "basis_sharing": (
        "**Basis Sharing** (arXiv 2410.03765): the q/k/v/up/gate projections of a group of consecutive layers are "
        "factored by a whitened SVD into one basis shared by the group and small per-layer coefficients; the other "
        "projections get ordinary per-layer low-rank factors."
    ),
}
VQ_DESCRIPTION = (
    "This model uses swsc_hf's **codebook vector quantization with row scales** instead of whole channels: every "
    "channel is cut into short segments (single weights when the segment length is 1), each segment is normalised "
    "by its channel's scale (when scales are stored) and replaced by the index of the nearest codeword of a small "
    "shared codebook."
)


def _quantization_settings(model: PreTrainedModel) -> tuple[dict[str, Any], Any]:
    """The serialized swsc_hf config of `model` (as a dict) and the config object itself."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    settings = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    if settings.get("quant_method") != "swsc":
        raise ValueError(
            "build_model_card needs a model compressed by swsc_hf (config.quantization_config of "
            f"quant_method 'swsc'); this one has {settings.get('quant_method')!r}"
        )
    return settings, config


def _hub_repo_id(name: str | None) -> str | None:
    """`name` if it can be a Hub repo id (not a local path), else None: base_model must name a Hub repo."""
    if not name or os.path.exists(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _layout(settings: dict[str, Any]) -> str:
    """One sentence saying what a compressed layer stores, derived from the settings."""
    channel = "row (output channel)" if settings.get("cluster_dim", "output") == "output" else "column (input channel)"
    k = settings.get("n_clusters") or 0
    parts = []
    if k:
        count = f"{k:.0%} as many codewords as channels" if isinstance(k, float) else f"{k} codewords"
        segment = settings.get("segment_length")
        bits = f"{math.ceil(math.log2(k))}-bit index" if isinstance(k, int) and k > 1 else "index"
        if segment is None:
            parts.append(f"each {channel} is replaced by one of {count} (a {bits} per channel)")
        elif segment == 1:
            parts.append(f"each weight is replaced by one of {count} (a {bits} per weight)")
        else:
            parts.append(
                f"each {channel} is cut into segments of {segment} weights, each replaced by one of {count} "
                f"(a {bits} per segment)"
            )
        rows = settings.get("rows_per_codebook") or 0
        parts.append(f"one codebook per {rows} channels" if rows else "one codebook per matrix")
        group = settings.get("scale_group_size") or 0
        if group:
            parts.append("one scale per channel" if group == -1 else f"one scale per channel and {group} weights")
    if settings.get("rank"):
        parts.append(f"plus a rank-{settings['rank']} low-rank term")
    elif settings.get("parameter_ratio") is not None and not k:
        parts.append(f"low-rank factors keeping {settings['parameter_ratio']:.0%} of each layer's parameters")
    if settings.get("share_types") and (settings.get("share_group_size") or 1) > 1:
        parts.append(f"{', '.join(settings['share_types'])} share one basis per {settings['share_group_size']} layers")
    return "Layout of a compressed layer: " + "; ".join(parts) + "."


def _settings_table(settings: dict[str, Any]) -> str:
    rows = ["| setting | value |", "|---|---|"]
    for key, value in settings.items():
        if key in ("quant_method", "compressed_layers"):
            continue
        rows.append(f"| `{key}` | `{value}` |")
    rows.append(f"| compressed layers | {len(settings.get('compressed_layers') or {})} |")
    return "\n".join(rows)


def _calibration_line(config: Any) -> str:
    dataset = getattr(config, "dataset", None)
    if dataset is None:
        return "Compression was data-free (no calibration data), or the calibration data was not recorded."
    name = dataset if isinstance(dataset, str) else f"{len(dataset)} user-supplied texts"
    return (
        f"Compression was calibrated on {name} ({getattr(config, 'n_samples', '?')} sequences of "
        f"{getattr(config, 'seq_len', '?')} tokens)."
    )


def _size_section(report: dict[str, Any]) -> str:
    mib = 2**20
    stored, dense = report["model_stored_bytes"], report["model_dense_bytes"]
    return "\n".join([
        "| | value |",
        "|---|---|",
        f"| compressed layers | {len(report['layers'])} |",
        f"| average bits per weight (compressed layers) | {report['compressed_bits_per_weight']:.3f} |",
        f"| average bits per parameter (whole model) | {report['model_bits_per_weight']:.3f} |",
        f"| stored size | {stored / mib:.2f} MiB |",
        f"| dense size (same dtype) | {dense / mib:.2f} MiB |",
        f"| ratio | {dense / max(stored, 1):.2f}x smaller |",
        "",
        "Sizes are measured on the model's tensors: codebooks, bit-packed codes, scales, low-rank factors and shared "
        "bases, plus the layers kept dense (embeddings, norms, lm_head).",
    ])  # fmt: skip


def _quality_section(metrics: dict[str, Any] | None) -> str:
    if not metrics or metrics.get("perplexity") is None:
        return "Perplexity was not measured for this upload."
    dense = metrics.get("dense_perplexity")
    return "\n".join([
        "| dataset | context (tokens) | evaluated tokens | perplexity | dense perplexity |",
        "|---|---|---|---|---|",
        f"| {metrics.get('dataset', '?')} | {metrics.get('seq_len', '?')} | {metrics.get('tokens', '?')} | "
        f"{metrics['perplexity']:.4f} | {'not measured' if dense is None else f'{dense:.4f}'} |",
    ])  # fmt: skip


def _load_section(repo_id: str | None) -> str:
    repo = repo_id or "<this-repo-id>"
    return f"""```bash
pip install swsc-hf
```

```python
import swsc_hf  # noqa: F401  registers the "swsc" quantization method with transformers
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("{repo}")
```

> [!WARNING]
> Without `import swsc_hf`, transformers only logs "Unknown quantization type" and builds a dense model whose
> compressed projections are randomly initialised: it loads without an error but the model is wrong."""


def build_model_card(
    model: PreTrainedModel,
    *,
    base_model: str | None = None,
    metrics: dict[str, Any] | None = None,
    repo_id: str | None = None,
) -> ModelCard:
    """The model card of an swsc_hf-compressed model, from its quantization config and a fresh size report.

    `metrics` may hold dataset, seq_len, tokens, perplexity and dense_perplexity (one measured evaluation);
    `base_model` is kept only if it can be a Hub repo id (a local path is dropped); `repo_id` fills the load snippet.
    """
    settings, config = _quantization_settings(model)
    report = compression_report(model).to_dict()
    method = settings.get("method", "swsc")
    base = _hub_repo_id(base_model)
    architectures = getattr(model.config, "architectures", None) or [type(model).__name__]
    card_data = ModelCardData(
        library_name="transformers",
        tags=[*TAGS, method.replace("_", "-")],
        base_model=base,
        base_model_relation="quantized" if base else None,
        pipeline_tag="text-generation" if architectures[0].endswith("ForCausalLM") else None,
    )
    description = METHOD_DESCRIPTIONS.get(method, f"Method `{method}`.")
    if method == "swsc" and settings.get("n_clusters") and settings.get("segment_length") is not None:
        description += "\n\n" + VQ_DESCRIPTION
    title = repo_id.split("/")[-1] if repo_id else f"{architectures[0]} compressed with swsc_hf"
    origin = f"[{base}](https://huggingface.co/{base})" if base else f"a {architectures[0]} model"
    preset = f" (preset `{settings['preset']}`)" if settings.get("preset") else ""
    body = f"""# {title}

This is {origin} compressed with [swsc_hf](https://pypi.org/project/swsc-hf/), method `{method}`{preset}: its linear
layers are stored in compressed form (shared codebooks, bit-packed codes and/or low-rank factors) and run compressed
in transformers.

## Method

{description}

{_layout(settings)}

{_calibration_line(config)}

## Compression settings

{_settings_table(settings)}

## Size

{_size_section(report)}

## Quality

{_quality_section(metrics)}

## How to load

{_load_section(repo_id)}
"""
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")


def _upload_with_card(
    model: PreTrainedModel, working_dir: str | os.PathLike, repo_id: str, *args: Any, **kwargs: Any
) -> Any:
    """Instance override of `_upload_modified_files`: write the swsc_hf card into the folder, then upload."""
    config = getattr(model.config, "quantization_config", None)
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    if method == "swsc":  # after model.dequantize() the generic card is the right one
        readme = Path(working_dir) / "README.md"
        existing = ModelCard.load(readme).data if readme.exists() else ModelCardData()
        card_kwargs = dict(getattr(model, CARD_KWARGS_ATTR, {}))
        if card_kwargs.get("base_model") is None and isinstance(existing.get("base_model"), str):
            card_kwargs["base_model"] = existing["base_model"]
        card = build_model_card(model, repo_id=repo_id, **card_kwargs)
        ours = card.data.to_dict()
        other_tags = [t for t in existing.get("tags") or [] if t not in ours["tags"]]
        for key, value in ours.items():
            existing[key] = value
        existing["tags"] = [*ours["tags"], *other_tags]
        card.data = existing
        card.save(readme)
    return getattr(type(model), _UPLOAD_HOOK)(model, working_dir, repo_id, *args, **kwargs)


def _is_swsc_card(readme: Path) -> bool:
    try:
        return "swsc_hf" in (ModelCard.load(readme).data.get("tags") or [])
    except Exception:  # noqa: BLE001 - an unreadable README is the user's: leave it alone
        return False


def _save_with_card(model: PreTrainedModel, save, *args, **kwargs):
    """`save_pretrained`, then the swsc_hf card as README.md beside the checkpoint (as `push_to_hub` uploads it);
    a README.md that is not an swsc_hf card (the user's own) is left as it is."""
    result = save(*args, **kwargs)
    directory = kwargs.get("save_directory", args[0] if args else None)
    if directory is not None and Path(directory).is_dir() and getattr(model, "is_quantized", False):
        readme = Path(directory) / "README.md"
        if not readme.exists() or _is_swsc_card(readme):
            build_model_card(model, **getattr(model, CARD_KWARGS_ATTR, {})).save(readme)
    return result


def install_model_card(
    model: PreTrainedModel, *, base_model: str | None = None, metrics: dict[str, Any] | None = None
) -> None:
    """Make `model.push_to_hub(...)` (and `save_pretrained(..., push_to_hub=True)`) upload the swsc_hf card, and
    `model.save_pretrained(folder)` write it as `folder/README.md`.

    The card is built at upload time, so it describes the model as pushed. Calling again updates `base_model` /
    `metrics` (None keeps the previous value). After `model.dequantize()` the hook steps aside (generic card).
    """
    if not hasattr(type(model), _UPLOAD_HOOK):
        logger.warning(
            "%s has no %s (transformers changed?): push_to_hub will upload the generic model card",
            type(model).__name__,
            _UPLOAD_HOOK,
        )
        return
    card_kwargs = dict(getattr(model, CARD_KWARGS_ATTR, {}))
    card_kwargs.update({k: v for k, v in (("base_model", base_model), ("metrics", metrics)) if v is not None})
    setattr(model, CARD_KWARGS_ATTR, card_kwargs)
    # A partial of a module-level function (not a bound method) keeps the model picklable and deep-copyable.
    setattr(model, _UPLOAD_HOOK, functools.partial(_upload_with_card, model))
    save = getattr(model, "save_pretrained", None)
    if save is not None and getattr(save, "func", None) is not _save_with_card:  # a local card on every save too
        model.save_pretrained = functools.partial(_save_with_card, model, save)


def push_compressed(
    model: PreTrainedModel,
    repo_id: str,
    *,
    metrics: dict[str, Any] | None = None,
    base_model: str | None = None,
    **push_kwargs: Any,
) -> Any:
    """Push an swsc_hf model with its card (and measured metrics, if given); returns push_to_hub's CommitInfo."""
    install_model_card(model, base_model=base_model, metrics=metrics)
    return model.push_to_hub(repo_id, **push_kwargs)
