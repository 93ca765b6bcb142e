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
    chunked = _chunks_logits(model, ids[: min(16, ids.numel())][None].to(device), seq_len)
    window_nll = []
    for window in tqdm(range(windows), desc="perplexity", unit="window", disable=not progress):
        batch = ids[window * seq_len : (window + 1) * seq_len][None].to(device)
        if chunked:
            window_nll.append(_chunked_nll(model, batch))
            continue
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], batch[0, 1:], reduction="sum")
        window_nll.append(float(loss))
    tokens = windows * (seq_len - 1)
    return PerplexityResult(math.exp(sum(window_nll) / tokens), tokens, windows, seq_len, window_nll)


LOGITS_CHUNK = 256  # positions whose logits exist at once when the vocabulary is large
LARGE_LOGITS = 2**26  # float32 logits of one window above this many values (256 MiB) are computed in chunks


def _head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    logits = model.get_output_embeddings()(hidden).float()
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    return torch.tanh(logits / softcap) * softcap if softcap else logits


def _chunked_nll(model, batch: torch.Tensor) -> float:
    """The window's summed NLL with the logits of `LOGITS_CHUNK` positions at a time (Gemma's 262k vocabulary
    would otherwise need 2 GiB of float32 logits per 2048-token window)."""
    hidden = model.get_decoder()(input_ids=batch, use_cache=False).last_hidden_state
    total = 0.0
    for start in range(0, batch.shape[1] - 1, LOGITS_CHUNK):
        stop = min(start + LOGITS_CHUNK, batch.shape[1] - 1)
        logits = _head_logits(model, hidden[:, start:stop])
        total += float(torch.nn.functional.cross_entropy(logits[0], batch[0, start + 1 : stop + 1], reduction="sum"))
    return total


def _chunks_logits(model, probe: torch.Tensor, seq_len: int) -> bool:
    """Whether to compute logits in chunks: only for a large vocabulary, and only where the decoder's last hidden
    state through the output embeddings (and Gemma's soft-capping) reproduces the model's own logits on `probe`."""
    vocab = model.config.get_text_config().vocab_size
    if vocab * seq_len <= LARGE_LOGITS:
        return False
    try:
        hidden = model.get_decoder()(input_ids=probe, use_cache=False).last_hidden_state
        mine = _head_logits(model, hidden)
    except (AttributeError, TypeError, NotImplementedError):
        return False
    theirs = model(input_ids=probe, use_cache=False).logits.float()
    return mine.shape == theirs.shape and torch.allclose(mine, theirs, rtol=1e-3, atol=1e-3)
