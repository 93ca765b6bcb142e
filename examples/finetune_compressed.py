"""Fine-tune a compressed SmolLM2-135M on WikiText-2 text on CPU, and measure how much of the compression gap closes.

Three modes:
  centroids  train only the codebooks (centroid fine-tuning, as in the weight-clustering paper)
  lora       train LoRA adapters on the compressed projections, then merge them exactly into the compressed
             low-rank terms (the model stays compressed)
  both       LoRA and codebooks together, merged the same way

Training text is the WikiText-2 validation split (`swsc_hf.wikitext2_calibration_rows`); perplexity is measured
on the test split (first --eval-tokens tokens, 512-token windows) for the dense model, the compressed model before
training, and after. One JSON line with the figures is printed and appended to --output.

    python examples/finetune_compressed.py --mode centroids --cache /tmp/smollm2-swsc3 --threads 1
    python examples/finetune_compressed.py --mode lora --steps 40 --cache /tmp/smollm2-swsc3 --save /tmp/ft-lora
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

import swsc_hf
from swsc_hf import (
    SWSCConfig,
    compression_report,
    finish_training,
    join_rows,
    load_smollm2,
    merge_and_unload,
    perplexity,
    prepare_for_training,
    wikitext2_calibration_rows,
)

LORA_LR, CODEBOOK_LR = 3e-3, 1e-2  # best of a short sweep (see docs/finetuning.md)
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["centroids", "lora", "both"], required=True)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (~10 min in all on 2 cores)")
    parser.add_argument("--preset", default="swsc-3bit", help="SWSCConfig preset, compressed data-free")
    parser.add_argument("--seq-len", type=int, default=256, help="training sequence length")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=None,
                        help=f"learning rate (default: {LORA_LR} for LoRA, {CODEBOOK_LR} for codebooks)")
    parser.add_argument("--codebook-lr", type=float, default=CODEBOOK_LR, help="codebook learning rate in --mode both")
    parser.add_argument("--train-scales", action="store_true",
                        help="also train the per-group scales in --mode centroids / both (default: codebooks only)")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-alpha", type=int, default=32)
    parser.add_argument("--eval-tokens", type=int, default=4096, help="test-split tokens scored (512-token windows)")
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute activations in the backward (saves memory, costs ~30%% time)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (default: torch's choice); on a busy machine 1 is often fastest")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="finetune_results.jsonl", help="JSON lines file the result is appended to")
    parser.add_argument("--cache", default=None,
                        help="folder for the compressed model: loaded from there when present, else compressed and "
                        "saved there (data-free compression of the 135M model takes minutes on 2 cores)")
    parser.add_argument("--save", default=None, help="save the fine-tuned compressed model here (save_pretrained)")
    return parser.parse_args()


def training_batches(tokenizer, seq_len: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """`steps` batches of `batch_size` windows of `seq_len` tokens at seeded random offsets in the validation text."""
    ids = tokenizer(join_rows(wikitext2_calibration_rows()), return_tensors="pt").input_ids[0]
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (steps, batch_size), generator=generator)
    return [torch.stack([ids[s : s + seq_len] for s in row.tolist()]) for row in starts]


def compressed_model(dense, args: argparse.Namespace):
    """`dense` compressed with --preset, or the same compression loaded from --cache."""
    if args.cache and (Path(args.cache) / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(args.cache)
        cached = model.config.quantization_config.preset
        if cached != args.preset:
            raise SystemExit(f"--cache {args.cache} holds a {cached!r} compression, not --preset {args.preset!r}")
        return model
    swsc_hf.compress_model(dense, SWSCConfig(preset=args.preset))
    if args.cache:
        dense.save_pretrained(args.cache)
    return dense


def evaluate(model, tokenizer, args: argparse.Namespace, label: str) -> float:
    model.eval()
    result = perplexity(model, tokenizer, seq_len=args.eval_seq_len, max_tokens=args.eval_tokens)
    print(f"{label}: perplexity {result.perplexity:.3f} over {result.tokens} tokens", flush=True)
    return result.perplexity


def build_trainable(model, args: argparse.Namespace):
    """The model to train and its optimizer parameter groups for the chosen mode."""
    if args.mode == "centroids":
        prepare_for_training(model, train_codebooks=True, train_scales=args.train_scales,
                             gradient_checkpointing=args.gradient_checkpointing)
        tables = [p for p in model.parameters() if p.requires_grad]
        return model, [{"name": "tables", "params": tables, "lr": args.lr or CODEBOOK_LR}]
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.05, target_modules=PROJECTIONS,
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    both = args.mode == "both"
    prepare_for_training(model, train_codebooks=both, train_scales=both and args.train_scales,
                         gradient_checkpointing=args.gradient_checkpointing)
    adapters = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    tables = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    groups = [{"name": "lora", "params": adapters, "lr": args.lr or LORA_LR}]
    if tables:
        groups.append({"name": "tables", "params": tables, "lr": args.codebook_lr})
    return model, groups


def train(model, groups: list[dict], batches: list[torch.Tensor]) -> float:
    """AdamW with a short warm-up and a cosine decay; returns the seconds spent."""
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    steps, warmup = len(batches), max(1, len(batches) // 10)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    start = time.perf_counter()
    progress = tqdm(batches, desc=f"training ({sum(p.numel() for g in groups for p in g['params'])} params)",
                    unit="step")
    for batch in progress:
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tokenizer = load_smollm2()
    dense_ppl = evaluate(model, tokenizer, args, "dense")
    model = compressed_model(model, args)
    before_ppl = evaluate(model, tokenizer, args, f"compressed ({args.preset})")
    bits_before = compression_report(model).compressed_bits_per_weight

    batches = training_batches(tokenizer, args.seq_len, args.batch_size, args.steps, args.seed)
    model, groups = build_trainable(model, args)
    seconds = train(model, groups, batches)
    if args.mode == "centroids":
        finish_training(model)  # codebooks back in the checkpoint's table dtype, as they will be saved
    else:
        model = merge_and_unload(model, mode="compressed")  # exact merge into the compressed low-rank terms
    after_ppl = evaluate(model, tokenizer, args, f"after {args.mode} fine-tuning")
    bits_after = compression_report(model).compressed_bits_per_weight  # a merged LoRA adds rank r to every layer
    if args.save:
        model.save_pretrained(args.save)
        tokenizer.save_pretrained(args.save)

    result = {
        "mode": args.mode, "steps": args.steps, "dense_ppl": round(dense_ppl, 4), "before_ppl": round(before_ppl, 4),
        "after_ppl": round(after_ppl, 4),
        "gap_recovered_fraction": round((before_ppl - after_ppl) / (before_ppl - dense_ppl), 4),
        "bits_per_weight_before": round(bits_before, 3), "bits_per_weight_after": round(bits_after, 3),
        "preset": args.preset, "seq_len": args.seq_len, "batch_size": args.batch_size,
        "eval_tokens": args.eval_tokens, "eval_seq_len": args.eval_seq_len, "train_seconds": round(seconds, 1),
        "lr": {group["name"]: group["initial_lr"] for group in groups}, "train_scales": args.train_scales,
        "lora_r": args.lora_r if args.mode != "centroids" else None, "seed": args.seed,
        "threads": torch.get_num_threads(),
    }
    line = json.dumps(result)
    print(line)
    with open(args.output, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")


if __name__ == "__main__":
    main()
