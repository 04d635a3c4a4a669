"""Perplexity the way llama.cpp's `llama-perplexity` computes it, for any system that gives logits.

The procedure (llama.cpp tools/perplexity/perplexity.cpp, `perplexity()`), applied alike to every
system measured here:
 1. The whole text is tokenized once (no BOS is added when the tokenizer does not add one; the
    SmolLM2 GGUF says `tokenizer.ggml.add_bos_token = false`).
 2. The tokens are cut into `len(tokens) // n_ctx` windows of `n_ctx` consecutive tokens that do not
    overlap; the tail that fills no window is dropped. With `add_bos`, each window's first token is
    replaced by the BOS token (what llama.cpp does when the vocabulary adds BOS).
 3. Each window is evaluated from an empty cache (positions 0 .. n_ctx - 1), logits at every position.
 4. Only the second half is scored: with first = n_ctx // 2, the logits at positions
    first .. n_ctx - 2 predict tokens first + 1 .. n_ctx - 1, so n_ctx - first - 1 tokens a window.
    (The first half gives every scored token at least n_ctx / 2 tokens of context.)
 5. PPL = exp(mean negative log-likelihood over all scored tokens), and llama.cpp's uncertainty
    PPL * sqrt(var(nll) / (count - 1)). Log-softmax is taken here in float64 for every system (llama.cpp's
    tool takes it in float32 with a float64 sum; the two differ far below the digits reported).

Numpy only: this module also runs in llama-cpp-python's separate virtual environment.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

TEXT_PATH = Path(__file__).resolve().parent / "data" / "coriolanus.txt"
TEXT_SHA256 = "2d306e78cec386377e569c99a6be0f0644011615eda41af910b7173924c84d7b"  # the text after the header line
DEFAULT_N_CTX = 512

LogitsFn = Callable[[list[int]], np.ndarray]  # window of n_ctx token ids -> logits [n_ctx, vocab]


def load_text(path: Path = TEXT_PATH, sha256: str | None = TEXT_SHA256) -> str:
    """The benchmark text: the file less its one '# ' header line (source and licence), checked against
    `sha256` so that numbers measured on it stay comparable."""
    raw = path.read_text(encoding="utf-8")
    header, sep, body = raw.partition("\n")
    if not header.startswith("# ") or not sep:
        raise ValueError(f"{path}: the first line must be a '# ' header naming the text's source and licence")
    if sha256 is not None and hashlib.sha256(body.encode("utf-8")).hexdigest() != sha256:
        raise ValueError(f"{path} was changed: its text no longer has sha256 {sha256}; numbers measured on "
                         "it would not compare with earlier ones (restore it with git checkout)")
    return body


def windows(tokens: list[int], n_ctx: int, add_bos: bool = False, bos: int | None = None) -> list[list[int]]:
    """The evaluated windows: consecutive, non-overlapping, n_ctx tokens each, tail dropped."""
    if n_ctx < 4 or n_ctx % 2:
        raise ValueError(f"n_ctx must be an even number >= 4, got {n_ctx}")
    if len(tokens) < 2 * n_ctx:
        raise ValueError(f"the text has {len(tokens)} tokens; perplexity at n_ctx={n_ctx} needs at least "
                         f"{2 * n_ctx} (llama.cpp's minimum): use a smaller n_ctx")
    if add_bos and bos is None:
        raise ValueError("add_bos needs the BOS token id")
    out = []
    for i in range(len(tokens) // n_ctx):
        window = list(tokens[i * n_ctx:(i + 1) * n_ctx])
        if add_bos:
            window[0] = bos
        out.append(window)
    return out


@dataclass
class Perplexity:
    ppl: float
    ppl_err: float  # llama.cpp's "+/-": PPL times the standard error of the mean NLL
    mean_nll: float
    n_ctx: int
    windows: int
    scored: int  # tokens scored in all
    tokens: int  # tokens in the text
    window_ppl: list[float] = field(default_factory=list)  # running PPL after each window, as llama.cpp prints

    def as_dict(self) -> dict:
        return asdict(self)


def window_nll(logits: np.ndarray, window: list[int]) -> np.ndarray:
    """Negative log-likelihoods of the scored second half of one window (float64)."""
    n_ctx = len(window)
    first = n_ctx // 2
    if logits.shape[0] != n_ctx:
        raise ValueError(f"logits have {logits.shape[0]} rows for a window of {n_ctx} tokens")
    rows = np.asarray(logits[first:n_ctx - 1], dtype=np.float64)
    targets = np.asarray(window[first + 1:], dtype=np.int64)
    peak = rows.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(rows - peak).sum(axis=1)) + peak[:, 0]
    return log_z - rows[np.arange(len(targets)), targets]


def perplexity(logits_fn: LogitsFn, tokens: list[int], n_ctx: int = DEFAULT_N_CTX, add_bos: bool = False,
               bos: int | None = None, progress: Callable[[int, float], None] | None = None) -> Perplexity:
    """Perplexity of `logits_fn` over `tokens` by the procedure above. `logits_fn(window)` must evaluate
    the window from an empty cache and return logits for all its positions."""
    nlls, running = [], []
    for i, window in enumerate(windows(tokens, n_ctx, add_bos, bos)):
        nll = window_nll(np.asarray(logits_fn(window)), window)
        if not np.isfinite(nll).all():
            raise FloatingPointError(f"window {i}: non-finite log-likelihoods (the model produced NaN or inf)")
        nlls.append(nll)
        running.append(math.exp(np.concatenate(nlls).mean()))
        if progress:
            progress(i, running[-1])
    allnll = np.concatenate(nlls)
    mean = float(allnll.mean())
    var = float((allnll ** 2).mean() - mean * mean)
    err = math.sqrt(var / (len(allnll) - 1)) if var > 0 else 0.0
    ppl = math.exp(mean)
    return Perplexity(ppl=ppl, ppl_err=ppl * err, mean_nll=mean, n_ctx=n_ctx, windows=len(nlls),
                      scored=len(allnll), tokens=len(tokens), window_ppl=running)
