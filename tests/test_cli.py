"""`lower-model`: every flag, the JSON contract, exit codes and one-line errors. In-process via
main(argv) on a tiny random config.json; one subprocess test of the console script; one SmolLM2 run."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lowering.cli import main

TINY = {"model_type": "llama", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "rope_theta": 10000.0, "max_position_embeddings": 256}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "config.json"
    path.write_text(json.dumps(TINY))
    return str(path)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_summary_text(tiny, capsys):
    code, out, _ = run(capsys, tiny)
    assert code == 0
    for piece in ("layers 3", "captured", "final", "rms_norm", "mlx.rope_paged_attention", "unsupported ops: none",
                  "lowering "):
        assert piece in out, (piece, out)


def test_json_contract(tiny, capsys):
    code, out, _ = run(capsys, tiny, "--format", "json")
    data = json.loads(out)
    assert code == 0
    assert {"model", "front", "dtype", "layers", "nodes", "passes", "ops", "unsupported", "timings"} <= set(data)
    assert data["front"] == "hf" and data["dtype"] == "float32" and data["layers"] == 3
    assert set(data["nodes"]) == {"captured", "final"} and data["nodes"]["final"] < data["nodes"]["captured"]
    for p in data["passes"]:
        assert {"name", "matched", "nodes_before", "nodes_after", "ms", "expected", "missed"} <= set(p)
    by_name = {p["name"]: p for p in data["passes"]}
    assert by_name["rms_norm"]["matched"] == 7 and by_name["rope"]["matched"] == 6 and not by_name["rope"]["missed"]
    # the first norm reads the embedding; the other 6 read a residual add and fuse with it (add_rms_norm)
    assert data["ops"]["mlx.rms_norm"] == 1 and data["ops"]["mlx.add_rms_norm"] == 6 and data["unsupported"] == []
    assert "check" not in data


def test_dtype(tiny, capsys):
    code, out, _ = run(capsys, tiny, "--dtype", "bfloat16", "--format", "json")
    assert code == 0 and json.loads(out)["dtype"] == "bfloat16"


def test_check(tiny, capsys):
    code, out, _ = run(capsys, tiny, "--check", "--format", "json")
    check = json.loads(out)["check"]
    assert code == 0
    assert check["max_abs_err"] <= 1e-4 * check["max_abs_logit"] and check["greedy_match"] is True
    assert check["within_tolerance"]


def test_check_quantized(tiny, capsys):
    """--quantize --check: the reference holds the weights the step reads (quantized, dequantized), so the
    bound is the full-precision one; the quantized projections merge (q/k/v, gate/up)."""
    code, out, _ = run(capsys, tiny, "--quantize", "q4:32", "--check", "--format", "json")
    data = json.loads(out)
    assert code == 0 and data["check"]["within_tolerance"] and data["check"]["greedy_match"] is True, data["check"]
    assert data["ops"]["mlx.quantized_linear"] == 3 * 4 + 1 and "linear" not in data["ops"]


def test_check_text(tiny, capsys):
    code, out, _ = run(capsys, tiny, "--check")
    assert code == 0 and "max_abs_err" in out and "greedy_match True" in out


@pytest.mark.parametrize("stage", ["captured", "rms_norm", "rope", "final"])
def test_stage_text(tiny, capsys, stage):
    code, out, _ = run(capsys, tiny, "--stage", stage)
    assert code == 0 and out.startswith("%")
    if stage == "captured":
        assert "rsqrt(" in out and "mlx." not in out
    else:
        assert "mlx.rms_norm(" in out
    assert ("mlx.rope(" in out) == (stage == "rope")  # made by rope, folded into the attention by rope_attention
    assert ("mlx.rope_paged_attention(" in out) == (stage == "final")


def test_stage_json(tiny, capsys):
    code, out, _ = run(capsys, tiny, "--stage", "final", "--format", "json")
    data = json.loads(out)
    assert code == 0 and data["stage"] == "final"
    assert any(n.get("target") == "mlx.rope_paged_attention" for n in data["nodes"])


def test_diff(tiny, capsys):
    code, out, _ = run(capsys, tiny, "--diff", "rms_norm")
    assert code == 0 and out.startswith("--- before rms_norm")
    assert "\n-%rsqrt" in out and "\n+%rms_norm" in out


def test_diff_json(tiny, capsys):
    code, out, _ = run(capsys, tiny, "--diff", "rope", "--format", "json")
    assert code == 0 and "+%rope" in json.loads(out)["diff"]


def test_emit(tiny, capsys):
    code, out, _ = run(capsys, tiny, "--emit")
    assert code == 0 and "def step(w, kv, batch, input_ids, positions, logits_indices)" in out
    assert "k.rms_norm(" in out and "k.rope_paged_attention(" in out
    compile(out, "step.py", "exec")


def test_dot_collapses_layers(tiny, capsys):
    code, out, _ = run(capsys, tiny, "--format", "dot")
    assert code == 0 and out.startswith("digraph")
    assert "cluster_model.layers.0" in out and "layer_1 [label" in out and "layer_2 [label" in out
    assert "cluster_model.layers.1" not in out


def test_dot_expand(tiny, capsys):
    code, out, _ = run(capsys, tiny, "--format", "dot", "--expand")
    assert code == 0 and all(f"cluster_model.layers.{i}" in out for i in range(3))
    assert "layer_1 [label" not in out


def test_dot_of_a_stage(tiny, capsys):
    code, out, _ = run(capsys, tiny, "--stage", "captured", "--format", "dot")
    assert code == 0 and out.startswith("digraph") and "rsqrt" in out


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz not installed")
def test_svg_out(tiny, capsys, tmp_path):
    target = tmp_path / "g.svg"
    code, out, err = run(capsys, tiny, "--format", "svg", "--out", target)
    assert code == 0 and out == "" and str(target) in err
    assert target.read_text().lstrip().startswith(("<?xml", "<svg")) and "mlx.rope_paged_attention" in target.read_text()


def test_svg_without_graphviz_says_how_to_get_it(tiny, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no `dot` here
    code, out, err = run(capsys, tiny, "--format", "svg", "--out", tmp_path / "g.svg")
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1, err
    assert "install graphviz" in err and "--format dot" in err, err


def test_out_writes_file(tiny, capsys, tmp_path):
    target = tmp_path / "sub" / "summary.json"
    code, out, _ = run(capsys, tiny, "--format", "json", "--out", target)
    assert code == 0 and out == "" and json.loads(target.read_text())["layers"] == 3


def test_add_pass_shows_in_the_table(tiny, capsys):
    # silu_mul is a default pass: take it out, then add it back as a pass developer would
    code, out, _ = run(capsys, tiny, "--skip-pass", "silu_mul", "--add-pass", "passes.fused.silu_mul:PASS", "--format", "json")
    data = json.loads(out)
    names = [p["name"] for p in data["passes"]]
    assert code == 0 and names[-4:] == ["silu_mul", "final_cleanup", "rope_attention", "squeeze_batch"]  # added before final_cleanup
    silu = data["passes"][-4]
    assert silu["matched"] == silu["expected"] == 3 and data["ops"]["mlx.silu_mul"] == 3 and "silu" not in data["ops"]


def test_skip_pass(tiny, capsys):
    code, out, _ = run(capsys, tiny, "--skip-pass", "rms_norm", "--format", "json")
    data = json.loads(out)
    assert code == 0 and "rms_norm" not in [p["name"] for p in data["passes"]] and "rsqrt" in data["ops"]


def test_missed_pass_is_marked(tiny, capsys):
    code, out, _ = run(capsys, tiny, "--add-pass", "tests_cli_helpers:NEVER")
    assert code == 0 and "<-- MISSED" in out and "! never" in out


def test_unsupported_exit_2_with_full_report(tmp_path, capsys):
    cfg = dict(TINY, hidden_act="mish")  # aten.mish has no MLX lowering
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    code, out, _ = run(capsys, path, "--format", "json")
    data = json.loads(out)
    if not data["unsupported"]:
        pytest.skip("mish is supported now: pick another unsupported op")
    assert code == 2 and data["passes"] and all({"target", "module", "source"} <= set(u) for u in data["unsupported"])
    assert any("mish" in u["target"] and "mlp" in u["module"] for u in data["unsupported"])
    code, out, _ = run(capsys, path)
    assert code == 2 and "UNSUPPORTED: " in out and "pass " in out


def test_env(capsys):
    code, out, _ = run(capsys, "env")
    assert code == 0 and "mlx" in out and "torch" in out and "cache dir" in out and "blas." in out


def test_env_json(capsys):
    code, out, _ = run(capsys, "env", "--format", "json")
    data = json.loads(out)
    assert code == 0 and {"torch", "mlx", "vllm"} <= set(data["versions"]) and data["mlx_device"] and data["kernel_table"]
    assert "sgemm_library" in data["blas"] and data["cache_dir"]


@pytest.mark.parametrize("argv, fragment", [
    (["/no/such/model"], "no such file or directory"),
    (["{bad}"], "no such file"),
    (["--bogus-flag"], "unrecognized arguments"),
    (["--format", "png"], "invalid choice"),
])
def test_bad_inputs_exit_1(capsys, argv, fragment):
    code, _, err = run(capsys, *argv)
    assert code == 1 and fragment in one_line_error(err)


def test_non_json_config(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text("model_type: llama\n")
    code, _, err = run(capsys, path)
    assert code == 1 and "not a JSON config" in one_line_error(err)


def test_unknown_architecture(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "definitely_not_a_model", "hidden_size": 8}))
    code, _, err = run(capsys, path)
    assert code == 1 and "unknown architecture" in one_line_error(err)


def test_not_a_causal_lm(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "vit"}))
    code, _, err = run(capsys, path)
    assert code == 1 and "not a causal LM" in one_line_error(err)


@pytest.mark.parametrize("flag", ["--stage", "--diff"])
def test_unknown_pass_name(tiny, capsys, flag):
    code, _, err = run(capsys, tiny, flag, "no_such_pass")
    assert code == 1 and "unknown pass 'no_such_pass'" in one_line_error(err)


def test_bad_add_and_skip_pass(tiny, capsys):
    assert run(capsys, tiny, "--add-pass", "passes.nothing:PASS")[0] == 1
    code, _, err = run(capsys, tiny, "--skip-pass", "nope")
    assert code == 1 and "unknown pass" in one_line_error(err)


def test_vllm_front_without_capture_vllm(tiny, capsys, monkeypatch):
    import lowering.capture

    monkeypatch.delattr(lowering.capture, "capture_vllm", raising=False)
    code, _, err = run(capsys, tiny, "--front", "vllm")
    assert code == 1 and "--front vllm" in one_line_error(err)


def test_vllm_front_needs_weights(tiny, capsys):
    code, _, err = run(capsys, tiny, "--front", "vllm")
    assert code == 1 and "--front vllm" in one_line_error(err)


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(Exception):
        main(["/no/such/model", "--debug"])


def test_console_script(tiny, tmp_path):
    exe = Path(sys.executable).parent / "lower-model"
    if not exe.exists():
        pytest.skip("console script not installed (pip install -e .)")
    done = subprocess.run([str(exe), tiny, "--format", "json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["layers"] == 3
    bad = subprocess.run([str(exe), str(tmp_path / "missing")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_smollm2_summary(smollm2_path, capsys):
    code, out, _ = run(capsys, "smollm2", "--format", "json")
    data = json.loads(out)
    assert code == 0 and data["layers"] == 30 and data["unsupported"] == []
    assert data["ops"]["mlx.rms_norm"] == 1 and data["ops"]["mlx.add_rms_norm"] == 60
    assert data["ops"]["mlx.rope_paged_attention"] == 30 and "mlx.rope" not in data["ops"]
    assert not any(p["missed"] for p in data["passes"])
