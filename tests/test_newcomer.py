"""A newcomer's first hour (issue 17): bad input is one line and exit 2 at once, nothing is replaced
without --force / --merge (files byte-identical afterwards), no network traffic offline, and --help
explains every option, method and model."""
from __future__ import annotations

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
from suite.records import append_record, read_records

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def snapshot(path: Path) -> dict:
    """{relative path: (sha256, mode)} of every file under `path` (or of `path` itself)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path) if p != path else p.name): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                                                 stat.S_IMODE(p.stat().st_mode)) for p in files}


def one_error_line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.strip() and "Warning" not in l and "warn(" not in l]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# --------------------------------------------------------------------------- prune --out
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


# --------------------------------------------------------------------------- options checked before loading
@pytest.mark.parametrize("method, opt, says", [
    ("minillm", "direction=8", "has no option 'direction'"),
    ("minillm", "space=foo", "space='foo'"),
    ("magnitude", "norm=l3", "norm='l3': choose one of l2, l1"),  # issue 13: one schema, one wording
    ("llm-pruner", "importance=taylor", "importance='taylor': choose one of element1"),  # issue 13: one schema, one wording
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


def test_grid_method_options_are_checked_when_the_config_loads(tmp_path):
    from suite.pruning.errors import UserError
    from suite.config import load_config

    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\nmodels: [tiny-llama]\nratios: [0.2]\n"
                    "methods: [{name: magnitude, options: {norm: l3}}]\n")
    with pytest.raises(UserError, match=r"bad.yaml: methods\[0\]\.options: magnitude option norm='l3': choose one of l2, l1"):
        load_config(path)


# --------------------------------------------------------------------------- run --out
GRID = """name: {name}
models: [tiny-llama]
methods: [random]
ratios: [{ratio}]
dense: false
evaluation: {{perplexity: [wikitext2], tasks: [], max_tokens: 512}}
"""


@pytest.fixture
def fake_env(monkeypatch):
    monkeypatch.setenv("MINILLM_CELL_FN", "fake_cell:run_cell")
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    monkeypatch.setenv("FAKE_CELL_SLEEP", "0")


def config(tmp_path, name="mine", ratio=0.2) -> Path:
    path = tmp_path / f"{name}-{ratio}.yaml"
    path.write_text(GRID.format(name=name, ratio=ratio))
    return path


def other_grid_record(cell_grid) -> dict:
    cell = {"model": "tiny-opt", "method": "magnitude", "label": "magnitude", "ratio": 0.5, "seed": 0, "options": {}}
    if cell_grid is not None:
        cell["grid"] = cell_grid
    return {"model": "tiny-opt", "method": "magnitude", "label": "magnitude", "ratio_target": 0.5, "seed": 0,
            "status": "ok", "cell": cell, "cell_key": "0" * 64, "perplexity": {"wikitext2": 3.0}}


@pytest.mark.parametrize("case", ["other name", "legacy record of another grid", "edited config"])
def test_run_out_refuses_another_grids_records(tmp_path, fake_env, capsys, case):
    out = tmp_path / "results.jsonl"
    if case == "other name":
        append_record(out, other_grid_record({"name": "theirs", "config_hash": "0123456789abcdef"}))
    elif case == "legacy record of another grid":
        append_record(out, other_grid_record(None))
    else:  # the same name, another version of the grid: its records were made by the 0.2 config
        assert main(["run", str(config(tmp_path, ratio=0.2)), "--out", str(out), "--quiet"]) == 0
        capsys.readouterr()
    before = out.read_bytes()
    mine = config(tmp_path, ratio=0.5)
    assert main(["run", str(mine), "--out", str(out), "--quiet"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(out) in line and "--merge" in line
    assert out.read_bytes() == before
    assert main(["run", str(mine), "--out", str(out), "--quiet", "--merge"]) == 0
    records = read_records(out)
    assert len(records) == len(before.splitlines()) + 1 and records[-1]["cell"]["grid"]["name"] == "mine"


def test_run_resumes_its_own_grid_without_merge(tmp_path, fake_env, capsys):
    out, mine = tmp_path / "results.jsonl", config(tmp_path)
    assert main(["run", str(mine), "--out", str(out), "--quiet"]) == 0
    assert main(["run", str(mine), "--out", str(out), "--quiet"]) == 0
    assert len(read_records(out)) == 1  # the cell was done: skipped, not refused


# --------------------------------------------------------------------------- offline: no network at all
def guarded(args, env_set: dict, env_unset=(), cwd=None):
    """Run the CLI under tests/no_network.py; (process, network attempts logged)."""
    log = Path(cwd or ROOT) / "network.log"
    env = {k: v for k, v in os.environ.items() if k not in env_unset}
    env.update(env_set, NO_NETWORK_LOG=str(log), PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(TESTS / "no_network.py"), *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)
    attempts = log.read_text().splitlines() if log.exists() else []
    return proc, attempts


OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
NO_HUB_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT")


@pytest.mark.parametrize("case", ["no mirror, offline", "no mirror, no network", "mirror path missing",
                                  "missing path under an existing dir", "hub id, offline", "hub id, no network",
                                  "eval, no mirror, offline"])
def test_offline_errors_are_one_line_and_send_nothing(tmp_path, case):
    (tmp_path / "out").mkdir()
    (tmp_path / "hf").mkdir()
    env = {"HF_HOME": str(tmp_path / "hf")}  # an empty hub cache: nothing is cached
    unset = ["MINILLM_DATA"] if "no mirror" in case else []
    if "no network" in case:
        unset += NO_HUB_VARS
    else:
        env |= OFFLINE
    model, method = "tiny-opt", "flap"
    if case == "mirror path missing":
        env["MINILLM_DATA"] = str(tmp_path / "no-such-mirror")
    elif case == "missing path under an existing dir":
        model, method = "out/wanda", "random"
        unset += NO_HUB_VARS  # even with the hub allowed, a path is no hub id
    elif case.startswith("hub id"):
        model, method = "someone/some-model", "random"
    if case.startswith("eval"):
        args = ["eval", "--model", model, "--ppl", "wikitext2"]
    else:
        args = ["prune", "--model", model, "--method", method, "--ratio", "0.2", "--out", str(tmp_path / "o")]
    proc, attempts = guarded(args, env, unset, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc.stderr)
    expected = {"no mirror, offline": "MINILLM_DATA is not set and HF_HUB_OFFLINE=1",
                "no mirror, no network": "MINILLM_DATA is not set and the hub",
                "mirror path missing": str(tmp_path / "no-such-mirror"),
                "missing path under an existing dir": "out/wanda: no such directory",
                "hub id, offline": "HF_HUB_OFFLINE=1",
                "hub id, no network": "unreachable",
                "eval, no mirror, offline": "MINILLM_DATA is not set"}[case]
    assert expected in line
    if "no network" in case:
        assert len(attempts) <= 2, attempts  # one probe (name lookup + connect), no retries
    else:
        assert attempts == []
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- help
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
