"""The method registry (suite/methods.py) and the README's "Adding a method in minutes", followed
literally: the template module written to a folder, its one registry entry added, then every command."""
import json
import re

import pytest

from suite.cli import main
from suite.methods import METHODS, Method, method_order, methods_help, registered
from suite.pruning.errors import UserError
from tests.method_template import install, readme_block


def test_registry_entries_carry_summary_order_and_memory():
    assert all(isinstance(entry, Method) and entry.summary for entry in METHODS.values())
    assert method_order() == ["dense", *METHODS]
    assert "llm-pruner" in methods_help() and METHODS["llm-pruner"].forward_only is False
    for entry in METHODS.values():  # every named formula exists
        if entry.memory:
            module, function = entry.memory.split(":")
            assert callable(getattr(__import__(module, fromlist=[function]), function))
    with pytest.raises(UserError, match="unknown method 'nope'"):
        registered("nope")


def test_readme_template_is_about_30_lines_and_names_the_statistics():
    source = readme_block("method template")
    assert len(source.splitlines()) <= 40
    text = open(__import__("tests.method_template", fromlist=["README"]).README, encoding="utf-8").read()
    section = text[text.index("## Adding a method in minutes"):text.index("## Guard your method's quality in CI")]
    for name in ("l2", "mean", "var", "mean_abs", "sum_sq", "sum_abs", "streaming", "input_stats", "output_only"):
        assert re.search(rf"[`.]{name}\b", section), name


@pytest.mark.slow
def test_readme_template_runs_prune_grid_dry_run_table_and_check(tmp_path, monkeypatch, capsys):
    name = install(tmp_path / "code", monkeypatch)
    assert name == "l1act" and METHODS[name].memory is None  # the generic memory formula will be used
    out = tmp_path / "pruned"
    assert main(["prune", "--model", "tiny-llama", "--method", name, "--ratio", "0.3", "--nsamples", "4",
                 "--seqlen", "32", "--out", str(out)]) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert len(plan["layers"]) == 4 and all(layer["channels"] for layer in plan["layers"])
    printed = capsys.readouterr().out
    assert re.search(r"l1act on tiny-llama: removed [\d,]+ of [\d,]+ parameters \(0\.2\d+ of all", printed)
    config = tmp_path / "grid.yaml"
    config.write_text(f"""name: template-grid
models: [tiny-llama]
methods: [{name}]
ratios: [0.3]
calibration: {{apply_to: all, corpus: c4, nsamples: 4, seqlen: 32}}
evaluation: {{perplexity: [wikitext2], seqlen: 64, max_tokens: 512, tasks: [], throughput: false}}
""")
    assert main(["run", str(config), "--dry-run"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if f" {name} " in line)
    cells = [c.strip() for c in row.split("|")]
    assert float(cells[6]) > float(cells[4]) > 0  # score peak (GiB) above the load's: the formula ran
    results = tmp_path / "results.jsonl"
    assert main(["run", str(config), "--out", str(results), "--quiet"]) == 0
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["label"], r["status"]) for r in records] == [("dense", "ok"), (name, "ok")]
    assert records[1]["kept"] and records[1]["ratio_achieved_layers"] > records[1]["ratio_achieved"]
    capsys.readouterr()
    assert main(["table", str(results)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "| dense " in table[2] and f"| {name} " in table[3]
    assert main(["check", str(results), "--reference", str(results)]) == 0
    assert "PASS: 2 cells compared, 0 problems" in capsys.readouterr().out
    empty = tmp_path / "none.jsonl"
    empty.write_text("")
    assert main(["check", str(results), "--reference", str(empty)]) == 0  # no reference yet: listed, not failed
    assert f"no reference: tiny-llama / {name} @ 0.3 seed 0" in capsys.readouterr().out
