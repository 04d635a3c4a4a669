"""The perplexity procedure of benchmarks/perplexity_procedure.py (llama-perplexity's) against torch's cross
entropy on the scored halves, its windows, and the bundled text's checks."""

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("perplexity_procedure", ROOT / "benchmarks" / "perplexity_procedure.py")
ppl = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(ppl)

VOCAB = 97


def fake_model(seed: int):
    """A deterministic 'model': logits a fixed function of (position, token), so a window's logits
    depend on its content and position only, as a real causal model's do from an empty cache."""
    table = np.random.default_rng(seed).normal(0, 3, (64, VOCAB, VOCAB)).astype(np.float32)
    calls = []

    def logits(window):
        calls.append(list(window))
        return np.stack([table[p % 64, t] for p, t in enumerate(window)])
    return logits, calls


def test_matches_cross_entropy_of_second_halves():
    tokens = np.random.default_rng(1).integers(0, VOCAB, 1000).tolist()
    fn, calls = fake_model(2)
    got = ppl.perplexity(fn, tokens, n_ctx=128)
    nll = []
    for i in range(1000 // 128):  # 7 windows, the 104-token tail dropped
        w = tokens[i * 128:(i + 1) * 128]
        lg = torch.tensor(fn(w), dtype=torch.float64)
        nll.append(torch.nn.functional.cross_entropy(lg[64:127], torch.tensor(w[65:]), reduction="none"))
    nll = torch.cat(nll)
    want = math.exp(nll.mean().item())
    assert got.windows == 7 and got.scored == 7 * 63 == len(nll)
    assert abs(got.ppl - want) <= 1e-12 * want, f"PPL {got.ppl} vs torch {want}"
    err = want * math.sqrt(((nll ** 2).mean() - nll.mean() ** 2).item() / (len(nll) - 1))
    assert abs(got.ppl_err - err) <= 1e-9 * err
    assert got.window_ppl[-1] == got.ppl
    assert calls[:7] == [tokens[i * 128:(i + 1) * 128] for i in range(7)]


def test_bos_replaces_each_windows_first_token():
    tokens = list(range(1, 41))
    assert [w[0] for w in ppl.windows(tokens, 8, add_bos=True, bos=0)] == [0] * 5
    assert ppl.windows(tokens, 8)[1] == list(range(9, 17))


def test_too_few_tokens_and_bad_logits_are_refused():
    with pytest.raises(ValueError, match="needs at least 256"):
        ppl.windows(list(range(255)), 128)
    with pytest.raises(FloatingPointError, match="window 0"):
        ppl.perplexity(lambda w: np.full((len(w), VOCAB), np.nan, np.float32), list(range(64)), n_ctx=32)


def test_bundled_text_is_intact_and_long_enough(smollm2_path):
    from transformers import AutoTokenizer

    text = ppl.load_text()
    assert ppl.TEXT_PATH.read_text().startswith("# ") and "public domain" in ppl.TEXT_PATH.read_text().splitlines()[0]
    tokens = AutoTokenizer.from_pretrained(smollm2_path).encode(text, add_special_tokens=False)
    assert len(tokens) >= 2000 and len(ppl.windows(tokens, ppl.DEFAULT_N_CTX)) >= 4


def test_a_changed_or_headerless_text_is_refused(tmp_path):
    changed = tmp_path / "coriolanus.txt"
    changed.write_text(ppl.TEXT_PATH.read_text().replace("Citizen", "Citizens", 1))
    with pytest.raises(ValueError, match="was changed"):
        ppl.load_text(changed)
    changed.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n")
    with pytest.raises(ValueError, match="header"):
        ppl.load_text(changed, sha256=None)
