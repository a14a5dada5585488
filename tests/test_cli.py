"""The CLI (suite/cli.py, suite/commands/): info and prune end to end; bad input is one line on stderr,
exit 2, nothing written; `--out` replaces nothing without `--force` (files byte-identical afterwards);
options are checked before the model loads; `--help` explains every option, method and model."""
import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from suite.cli import build_parser, main
from suite.methods import METHODS
from suite.models import load_model
from tests.cli_output import one_error_line, one_line_error


def run_cli(*args, env=None, cwd=None):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "suite", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=300)


def test_info_matches_config():
    proc = run_cli("info", "--model", "tiny-llama-gqa", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    cfg = load_model("tiny-llama-gqa").config
    assert info["layers"] == cfg.num_hidden_layers and info["heads"] == cfg.num_attention_heads
    assert info["kv_heads"] == cfg.num_key_value_heads and info["intermediate_size"] == cfg.intermediate_size
    assert info["head_dim"] == cfg.hidden_size // cfg.num_attention_heads
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_key_value_heads * info["head_dim"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # attention, MLP, two RMSNorms
    assert info["parameters"] == cfg.num_hidden_layers * per_layer + 2 * v * h + h


def test_prune_random_end_to_end(tmp_path):
    out = tmp_path / "pruned"
    proc = run_cli("prune", "--model", "tiny-opt", "--method", "random", "--ratio", "0.3", "--seed", "3",
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "pruning.json").read_text())
    model = load_model(str(out))
    assert sum(p.numel() for p in model.parameters()) == record["params"]["pruned"]
    assert abs(record["ratio_achieved"] - 0.3) <= 0.01
    assert record["provenance"]["seed"] == 3 and "git_commit" in record["provenance"]
    assert record["phases"]["score"]["peak_mb"] > 0
    # same seed -> same plan
    again = tmp_path / "again"
    assert run_cli("prune", "--model", "tiny-opt", "--method", "random", "--ratio", "0.3", "--seed", "3",
                   "--out", str(again)).returncode == 0
    assert (again / "plan.json").read_text() == (out / "plan.json").read_text()


@pytest.fixture
def gpt2_dir(tmp_path):
    from transformers import GPT2Config

    d = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, bos_token_id=0, eos_token_id=0).save_pretrained(d)
    return d


@pytest.mark.parametrize("case", ["unknown model", "unsupported architecture", "ratio 0", "ratio 1.5",
                                  "missing mirror file", "unknown method", "bad option"])
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, gpt2_dir, case):
    out = tmp_path / "out"
    args = {"model": "tiny-llama", "method": "random", "ratio": "0.2"}
    env = None
    extra = []
    if case == "unknown model":
        args["model"] = "no-such-model"
    elif case == "unsupported architecture":
        args["model"] = str(gpt2_dir)
    elif case == "ratio 0":
        args["ratio"] = "0"
    elif case == "ratio 1.5":
        args["ratio"] = "1.5"
    elif case == "missing mirror file":
        env = {"MINILLM_DATA": str(tmp_path / "empty-mirror")}
        extra = ["--ppl", "wikitext2"]
    elif case == "unknown method":
        args["method"] = "sparsegpt-2"
    elif case == "bad option":
        extra = ["--opt", "nonsense=1"]
    proc = run_cli("prune", "--model", args["model"], "--method", args["method"], "--ratio", args["ratio"],
                   "--out", str(out), *extra, env=env)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip() and "Warning" not in l and "warn(" not in l]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    if case == "missing mirror file":
        assert str(tmp_path / "empty-mirror") in lines[0]
    assert not out.exists()
    assert not any(p.name.startswith(".out.tmp") for p in tmp_path.iterdir())


# ------------------------------------------------------------------ --out: nothing replaced without --force
def snapshot(path: Path) -> dict:
    """{relative path: (sha256, mode)} of every file under `path` (or of `path` itself)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path) if p != path else p.name): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                                                 stat.S_IMODE(p.stat().st_mode)) for p in files}


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    out = tmp_path_factory.mktemp("prune") / "random"
    assert main(["prune", "--model", "tiny-opt", "--method", "random", "--ratio", "0.3", "--out", str(out),
                 "--quiet"]) == 0
    return out


def test_pruned_files_share_one_mode(pruned, tmp_path):
    probe = tmp_path / "probe"
    probe.write_text("x")  # a file this process creates: the umask's mode
    modes = {name: mode for name, (_, mode) in snapshot(pruned).items()}
    assert "model.safetensors" in modes and set(modes.values()) == {stat.S_IMODE(probe.stat().st_mode)}


@pytest.mark.parametrize("case", ["earlier model", "regular file", "other directory", "other directory --force"])
def test_prune_out_refuses_to_replace(pruned, tmp_path, capsys, case):
    if case == "earlier model":
        target = pruned
    elif case == "regular file":
        target = tmp_path / "notes.txt"
        target.write_text("my notes\n")
    else:
        target = tmp_path / "project"
        (target / "src").mkdir(parents=True)
        (target / "src" / "main.py").write_text("print(1)\n")
    before = snapshot(target)
    force = ["--force"] if case.endswith("--force") else []
    args = ["prune", "--model", "tiny-opt", "--method", "magnitude", "--ratio", "0.2", "--out", str(target), *force]
    assert main(args) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(target) in line and ("--force" in line or force)
    assert snapshot(target) == before
    assert not [p for p in target.parent.iterdir() if ".tmp" in p.name]


def test_prune_force_replaces_an_earlier_model_and_a_file(pruned, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(pruned, model)
    assert json.loads((model / "pruning.json").read_text())["method"] == "random"
    assert main(["prune", "--model", "tiny-opt", "--method", "magnitude", "--ratio", "0.2", "--out", str(model),
                 "--force", "--quiet"]) == 0
    assert json.loads((model / "pruning.json").read_text())["method"] == "magnitude"
    file = tmp_path / "file"
    file.write_text("old")
    assert main(["prune", "--model", "tiny-opt", "--method", "magnitude", "--ratio", "0.2", "--out", str(file),
                 "--force", "--quiet"]) == 0
    assert (file / "plan.json").is_file()


# ------------------------------------------------ options checked before loading; argparse's errors; --help
@pytest.mark.parametrize("method, opt, says", [
    ("minillm", "direction=8", "has no option 'direction'"),
    ("minillm", "space=foo", "space='foo'"),
    ("magnitude", "norm=l3", "norm='l3': choose one of l2, l1"),  # the Options' wording
    ("llm-pruner", "importance=taylor", "importance='taylor': choose one of element1"),
    ("flap", "head_power=two", "expected float"),
])
def test_method_options_are_checked_before_the_model_loads(monkeypatch, tmp_path, capsys, method, opt, says):
    import suite.models

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(suite.models, "load_model", no_load)
    monkeypatch.setattr(suite.models, "load_tokenizer", no_load)
    assert main(["prune", "--model", "tiny-llama", "--method", method, "--ratio", "0.2", "--out",
                 str(tmp_path / "o"), "--opt", opt]) == 2
    assert says in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, says", [
    (["--scope", "globl"], "argument --scope: invalid choice: 'globl'"),
    (["--round-to", "abc"], "argument --round-to: invalid int value: 'abc'"),
    (["--head-mode", "kv"], "argument --head-mode: invalid choice: 'kv'"),
])
def test_argparse_errors_are_one_line(tmp_path, capsys, args, says):
    """Not argparse's 13-line usage block: the suite's one line, exit 2."""
    from suite.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["prune", "--model", "tiny-llama", "--method", "magnitude", "--ratio", "0.2", "--out",
              str(tmp_path / "o"), *args])
    assert exit_.value.code == 2
    assert says in one_line_error(capsys)
    assert not (tmp_path / "o").exists()


def test_help_lists_methods_models_and_explains_every_option(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, command in commands.items():
        for action in command._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    with pytest.raises(SystemExit) as exit_:
        main(["prune", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for method, entry in METHODS.items():
        assert f"{method} {' '.join(entry.summary.split())}" in text
    for model in ("smollm2-135m", "tiny-llama", "tiny-llama-gqa", "tiny-opt", "tiny-bloom"):
        assert f"'{model}'" in text
    assert "Instruct" in text and "MINILLM_DATA" in text


@pytest.mark.parametrize("method, flags, says", [
    ("shortgpt", ["--head-mode", "kv-group"], "shortgpt removes whole layers: --head-mode kv-group would do nothing"),
    ("sleb", ["--allow-empty"], "sleb removes whole layers: --allow-empty would do nothing"),
    ("slicegpt", ["--allow-empty"], "slicegpt transforms the whole model (no groups to select): --allow-empty"),
    ("slicegpt", ["--head-mode", "kv-group"], "slicegpt transforms the whole model (no groups to select): --head-mode"),
])
def test_prune_refuses_flags_the_method_kind_never_reads_before_loading(tmp_path, capsys, monkeypatch, method, flags, says):
    from suite import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    out = tmp_path / "o"
    assert main(["prune", "--model", "tiny-llama-gqa", "--method", method, "--ratio", "0.3", "--out", str(out),
                 *flags]) == 2
    assert says in one_line_error(capsys)
    assert not out.exists()
