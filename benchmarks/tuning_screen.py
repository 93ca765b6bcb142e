"""Screen tuning settings of a calibrated preset from one fit: the preset is fitted once with tune_steps=0, then each
setting tunes a copy of those tables toward the dense model and is scored on a few windows of both text domains.

    python benchmarks/tuning_screen.py --preset swsc-2.2b-cal --steps 320 --settings \
        '[{"lr": 1e-3, "scales_lr": 6e-3, "norms_lr": 1e-3}, {"lr": 2e-3, "scales_lr": 6e-3, "norms_lr": 1e-3}]'

The fit is deterministic, so the settings differ only in their tuning; a screen is cheaper than a full run per
setting (one fit instead of one each, fewer steps, fewer windows), and its winners are confirmed by quality.py.
Tuning windows are the preset's own (a fresh calibration window per step, the first ones those the fit used), its
products in bfloat16 where the CPU multiplies them natively ("auto"). One JSON line per setting goes to --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import common
import torch

from swsc_hf import SWSCConfig, compress_model, distill_tables
from swsc_hf.compression import calibration_batches
from swsc_hf.evaluation import perplexity


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="swsc-2.2b-cal", help="a calibrated preset (SWSCConfig presets)")
    parser.add_argument("--fields", default="{}", help="JSON object of SWSCConfig fields set on top of the preset, "
                        'e.g. \'{"rotate_residual": true}\'')
    parser.add_argument("--steps", type=int, default=320, help="tuning steps per setting")
    parser.add_argument("--settings", required=True, help="JSON list of distill_tables step sizes per setting: "
                        "lr, scales_lr, norms_lr (null or absent: that part stays as fitted)")
    parser.add_argument("--windows", type=int, default=8, help="WikiText-2 test windows of 2048 tokens scored")
    parser.add_argument("--second-domain-windows", type=int, default=4, help="Shakespeare windows scored")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(common.RESULTS / "tuning-screen.jsonl"))
    args = parser.parse_args(argv)
    settings, fields = json.loads(args.settings), json.loads(args.fields)
    if not isinstance(settings, list) or not all(isinstance(s, dict) and "lr" in s for s in settings):
        raise SystemExit("--settings must be a JSON list of objects, each with at least an 'lr'")
    torch.set_num_threads(args.threads)
    info = common.run_info()
    dense, tokenizer = common.load_dense()
    teacher = copy.deepcopy(dense)
    config = SWSCConfig(**{**fields, "preset": args.preset, "dataset": "wikitext2", "tune_steps": 0,
                           "tokenizer": tokenizer})
    start = time.perf_counter()
    fitted = compress_model(dense, config)
    fit_seconds = time.perf_counter() - start
    # the windows the preset's own tuning would take: the same seeded sequence, the first ones those the fit used
    batches = calibration_batches(config, tokenizer, torch.device("cpu"), count=args.steps)
    second_text = common.shakespeare_text()
    for setting in settings:
        model = copy.deepcopy(fitted)
        start = time.perf_counter()
        losses = distill_tables(model, teacher, batches, steps=args.steps, lr=setting["lr"],
                                scales_lr=setting.get("scales_lr"), norms_lr=setting.get("norms_lr"),
                                compute_dtype="auto")
        tune_seconds = time.perf_counter() - start
        wikitext = perplexity(model, tokenizer, seq_len=2048, max_tokens=args.windows * 2048, progress=False)
        second = perplexity(model, tokenizer, second_text, seq_len=2048,
                            max_tokens=args.second_domain_windows * 2048, progress=False)
        record = {"preset": args.preset, **({"fields": fields} if fields else {}), "steps": args.steps, **setting,
                  "windows": args.windows,
                  "perplexity": wikitext.perplexity, "second_domain_windows": args.second_domain_windows,
                  "second_domain_perplexity": second.perplexity, "final_kl": losses[-1],
                  "fit_seconds": fit_seconds, "tune_seconds": tune_seconds, **info}
        print(json.dumps({k: record[k] for k in ("lr", "scales_lr", "norms_lr", "perplexity",
                                                  "second_domain_perplexity") if k in record}), flush=True)
        common.append_jsonl(args.out, record)


if __name__ == "__main__":
    main()
