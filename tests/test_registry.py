"""The registry sweep (`python -m vllm_metal_plugin.coverage --registry`, vllm_metal_plugin/sweep.py).

Default suite: the command on one architecture of each kind (`sweep.QUICK`: dense, MoE, multi-head latent
attention, interleaved sliding/global attention, a state-space model) with the vLLM engines, against the committed
baseline: no regression, the same outcome as the committed row, and docs/models.md is the baseline rendered.
The whole registry is behind the slow marker.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_metal_plugin import coverage, sweep

REPO = Path(__file__).resolve().parents[1]
MODELS_PAGE = REPO / "docs" / "models.md"


def _run(tmp_path, *args) -> tuple[subprocess.CompletedProcess, dict]:
    baseline = tmp_path / "baseline.json"
    shutil.copy(sweep.BASELINE, baseline)
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_metal_plugin.coverage", "--registry", "--workdir", str(tmp_path / "work"),
         "--baseline", str(baseline), "--out", str(tmp_path / "models.md"), *args],
        cwd=REPO, capture_output=True, text=True, timeout=3600)
    rows = {}
    for line in (tmp_path / "work" / "rows.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["arch"]] = row
    return proc, rows


def _same_outcome(rows: dict, committed: dict) -> dict:
    return {a: (r["outcome"], committed[a]["outcome"], r.get("reason") or r.get("missing"))
            for a, r in rows.items() if r["outcome"] != committed[a]["outcome"]}


def test_quick_registry_sweep_matches_committed_rows(tmp_path):
    """One architecture of each kind through the whole command (rows, then vLLM's engines): exit status 0, and each
    row's outcome and engine parity as committed."""
    committed = sweep.load_baseline()
    proc, rows = _run(tmp_path, "--quick")
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(rows) == set(sweep.QUICK)
    assert not _same_outcome(rows, committed), _same_outcome(rows, committed)
    stored = sweep.load_baseline(tmp_path / "baseline.json")
    for arch in sweep.QUICK:
        if sweep.passes(committed[arch]):
            assert sweep.passes(stored[arch]), stored[arch]
            assert stored[arch]["max_abs_err"] <= sweep.F32_TOLERANCE * stored[arch]["max_abs_logit"]


def test_a_regression_fails_the_command():
    """A row that passed in the baseline and does not now is a regression (and keeps its passing baseline entry,
    so the next run fails too)."""
    passing = {"outcome": "lowered", "engine": {"identical": True}}
    rows = {"A": {"outcome": "numerics off"}, "B": {"outcome": "lowered", "engine": {"identical": False}},
            "C": {"outcome": "lowered", "engine": {"identical": True}}, "D": {"outcome": "refused"}}
    baseline = {"A": passing, "B": passing, "C": passing, "D": {"outcome": "refused"}}
    assert sweep.regressions(rows, baseline) == ["A", "B"]


def test_engines_that_differ_are_judged_by_vllms_eager_model():
    """Where the plugin's greedy tokens differ from vLLM's CPU platform's, the row passes only when vLLM's own model
    run eagerly generates the plugin's tokens and not the CPU platform's."""
    differ = {"identical": False, "first_difference": [0, 0], "error": None}
    lowered = {"outcome": "lowered"}
    assert sweep.passes({**lowered, "engine": {**differ, "plugin_is_eager": True, "cpu_is_eager": False}})
    assert not sweep.passes({**lowered, "engine": {**differ, "plugin_is_eager": False, "cpu_is_eager": True}})
    assert not sweep.passes({**lowered, "engine": {**differ, "plugin_is_eager": False, "cpu_is_eager": False}})
    assert not sweep.passes({**lowered, "engine": differ})
    assert not sweep.passes({"outcome": "numerics off", "engine": {**differ, "plugin_is_eager": True}})
    judged = [a for a, r in sweep.load_baseline().items() if sweep.judged(r)]
    assert judged, "no committed row was judged"
    explained = {a for archs in sweep.CPU_PLATFORM_DIFFERENCES.values() for a in archs}
    assert set(judged) <= explained, f"say why vLLM's CPU platform differs for: {sorted(set(judged) - explained)}"


def test_models_page_is_the_committed_sweep():
    """docs/models.md's registry section is the committed baseline rendered, with a row for every architecture of
    vLLM's text-generation registry."""
    stored = sweep.load_baseline()
    everything = list(sweep.registry())
    assert set(everything) <= set(stored), sorted(set(everything) - set(stored))
    text = sweep.render({a: stored[a] for a in everything})
    page = MODELS_PAGE.read_text()
    assert f"<!-- registry -->\n{text}<!-- /registry -->" in page
    for arch, row in stored.items():
        if row["outcome"] == "refused":
            assert sweep.missing_items(row), arch
        if row["outcome"] == "not built":
            assert row.get("reason"), arch


_START = """
import sys
import runtime
from vllm import LLM
try:
    LLM(model=sys.argv[1], dtype="float32", max_model_len=256, skip_tokenizer_init=True, enforce_eager=True,
        max_num_seqs=4)
except Exception as exc:
    print("ENGINE ERROR:", exc)
"""


def test_plugin_refuses_an_unsupported_model_before_its_weights_load(tmp_path):
    """A real engine start (vllm.LLM with the plugin) on a model whose state-space layers have no lowering fails with
    the ops docs/models.md lists for it, before any weight loads: the checkpoint has no weight files, so a check
    after loading would fail on those instead."""
    arch = "MambaForCausalLM"
    config, _ = sweep.tiny_config(arch, sweep.registry()[arch][0])
    config.save_pretrained(tmp_path / "model")
    assert not list((tmp_path / "model").glob("*.safetensors"))
    env = {k: v for k, v in os.environ.items() if k not in coverage._SWITCHES}
    env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", _START, str(tmp_path / "model")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    errors = [line for line in proc.stdout.splitlines() if line.startswith("ENGINE ERROR:")]
    assert errors, proc.stdout[-2000:] + proc.stderr[-3000:]
    message = errors[0]
    assert f"vllm-metal: {arch} cannot run on this platform" in message, message
    missing = sweep.missing_items(sweep.load_baseline()[arch])
    assert missing and message.split("lacks: ", 1)[1].startswith("; ".join(missing)), (missing, message)
    assert "Loading weights took" not in proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.long
def test_full_registry_sweep_has_no_regression(tmp_path):
    """Every architecture of vLLM's registry: the command exits 0 (no row that passed before fails now)."""
    proc, rows = _run(tmp_path)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(rows) == set(sweep.registry())

