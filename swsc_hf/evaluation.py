"""WikiText-2-style perplexity, shared by `swsc-hf eval` and the benchmarks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .data import wikitext2_test_text


@dataclass
class PerplexityResult:
    perplexity: float
    tokens: int
    windows: int
    seq_len: int
    window_nll: list[float] = field(default_factory=list)  # summed negative log-likelihood of each window

    def prefix(self, windows: int) -> PerplexityResult:
        """The result over the first `windows` windows only (the same windows a shorter evaluation scores)."""
        if not 0 < windows <= len(self.window_nll):
            raise ValueError(f"prefix of {windows} windows asked from a result holding {len(self.window_nll)} "
                             "per-window losses; evaluate with `perplexity` over at least that many windows")
        nll = self.window_nll[:windows]
        tokens = windows * (self.seq_len - 1)
        return PerplexityResult(math.exp(sum(nll) / tokens), tokens, windows, self.seq_len, nll)


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    text: str | None = None,
    *,
    seq_len: int = 2048,
    max_tokens: int | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity over non-overlapping windows of `seq_len` tokens (the usual WikiText-2 recipe).

    `text` defaults to the WikiText-2 raw test split joined with "\\n\\n". The text is tokenized once; windows
    cover the first `max_tokens` tokens (whole windows only). Each window's first token is context only, so a
    window scores seq_len - 1 tokens, as in the GPTQ/OmniQuant evaluation code.
    """
    if text is None:
        text = wikitext2_test_text()
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    windows = ids.numel() // seq_len
    if windows == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}")
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    window_nll = []
    for window in tqdm(range(windows), desc="perplexity", unit="window", disable=not progress):
        batch = ids[window * seq_len : (window + 1) * seq_len][None].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], batch[0, 1:], reduction="sum")
        window_nll.append(float(loss))
    tokens = windows * (seq_len - 1)
    return PerplexityResult(math.exp(sum(window_nll) / tokens), tokens, windows, seq_len, window_nll)
