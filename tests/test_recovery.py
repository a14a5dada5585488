"""LoRA recovery (suite/recovery.py): the merge is W + B·A·(alpha/r), runs are seed-reproducible,
a diverging run fails cleanly, heterogeneous pruned models (a layer without attention) recover,
and a recovered directory still loads with plain transformers."""
import os
import subprocess
import sys

import pytest
import torch

from suite.pruning.saving import load_pruned, save_pruned
from suite import recovery
from suite.models import byte_tokenizer
from tests.checkpoints import (FAMILY_CASES, GENERATED, family_ids, plain_transformers_logits, plain_transformers_run,
                               pruned_family, pruned_tiny)
from tests.reference import rel_err

# a few steps on the mirrored Alpaca rows: tests, not LLM-Pruner's run (byte tokens: the prompt alone is ~190)
FAST = {"data": "tatsu-lab/alpaca", "batch_size": 4, "micro_batch_size": 2, "cutoff_len": 320,
        "val_set_size": 4, "max_steps": 3, "warmup_steps": 0, "logging_steps": 1, "learning_rate": 1e-3}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_merged_weights_equal_base_plus_scaled_BA():
    model, _ = pruned_tiny("tiny-llama-gqa")
    settings = recovery.settings_with_defaults({**FAST, "lora_r": 4, "lora_alpha": 12})
    names = recovery.lora_target_names(model)
    base = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    peft_model = recovery.attach_lora(model, settings)
    g = torch.Generator().manual_seed(0)
    factors = {}
    for n in names:  # B starts at zero: give every adapter a random non-zero B (as training would)
        lora = peft_model.base_model.model.get_submodule(n)
        with torch.no_grad():
            lora.lora_B["default"].weight.copy_(torch.randn(lora.lora_B["default"].weight.shape, generator=g))
        factors[n] = (lora.lora_A["default"].weight.detach().clone(), lora.lora_B["default"].weight.detach().clone())
    merged = recovery.merge_lora(peft_model)
    assert len(names) == 4 * 7 - 4  # layer 1 has no attention: its 4 zero-width projections are skipped
    for n in names:
        a, b = factors[n]
        assert a.shape[0] == 4 and b.shape[1] == 4
        expected = base[n] + (b @ a) * (12 / 4)
        torch.testing.assert_close(merged.get_submodule(n).weight, expected, rtol=1e-6, atol=1e-6)
        assert type(merged.get_submodule(n)) is torch.nn.Linear  # unloaded: plain Linears again


def _recovered_state(seed):
    model, _ = pruned_tiny("tiny-llama")
    out = recovery.recover(model, byte_tokenizer(), FAST, seed=seed)
    return {k: v.clone() for k, v in out.model.state_dict().items()}, out.info


def test_recovery_is_seed_reproducible_and_changes_weights():
    first, info = _recovered_state(0)
    second, _ = _recovered_state(0)
    other, _ = _recovered_state(1)
    untouched, _ = pruned_tiny("tiny-llama")
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(first[q], untouched.state_dict()[q])  # training moved the merged weights
    emb = "model.embed_tokens.weight"
    assert torch.equal(first[emb], untouched.state_dict()[emb])  # only LoRA targets change
    assert info["steps"] == 3 and info["examples"] == 102 - 4
    assert len(info["loss_log"]) == 3 and info["train_loss_final"] == info["loss_log"][-1][1]
    assert info["tokens_seen"] > 0 and info["lora"]["r"] == 8


@pytest.mark.parametrize("name", ["tiny-llama-gqa", "tiny-opt", "tiny-bloom"])
def test_heterogeneous_pruned_model_recovers_and_loads_plainly(tmp_path, name):
    """Layers of different widths, layer 1 with no attention at all; then save and load with plain transformers."""
    model, plan = pruned_tiny(name)
    widths = [p.shape for p in model.parameters()]
    out = recovery.recover(model, byte_tokenizer(), FAST, seed=0)
    assert [p.shape for p in out.model.parameters()] == widths
    assert out.info["steps"] == 3
    d = save_pruned(out.model, byte_tokenizer(), plan, tmp_path / "recovered")
    ids = torch.randint(3, 259, (2, 16), generator=torch.Generator().manual_seed(0))
    (plain,) = plain_transformers_logits([d], ids, tmp_path)
    with torch.no_grad():
        expected = out.model(ids).logits
        assert torch.equal(load_pruned(d)(ids).logits, expected)
    assert ((plain - expected).norm() / expected.norm()).item() <= 1e-6


@pytest.mark.parametrize("name", ["tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-gemma2", "tiny-gemma3", "tiny-phi3"])
def test_newer_families_recover_on_their_lora_targets(tmp_path, name):
    """Issue 14's families on a heterogeneous pruned model (layer 1 without attention): LoRA on the
    adapter's `lora_targets` (Phi-3: fused qkv_proj / gate_up_proj) changes every non-empty target
    weight and nothing else, keeps every width, and the saved directory reloads to the same logits."""
    from suite.pruning.architectures import adapter_for

    model, plan = pruned_tiny(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = recovery.recover(model, byte_tokenizer(), FAST, seed=0)
    after = out.model.state_dict()
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}
    targets = set(adapter_for(out.model).lora_targets)
    expected = {k for k, v in before.items()
                if k.endswith(".weight") and k.rsplit(".", 2)[-2] in targets and v.numel()}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert expected and changed == expected
    d = save_pruned(out.model, byte_tokenizer(), plan, tmp_path / "recovered")
    ids = torch.randint(3, 259, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_pruned(d)(ids).logits, out.model(ids).logits, rtol=1e-6, atol=1e-6)


def _trained_adapter(peft_model, seed):
    """Give every LoRA B a random non-zero value (it starts at zero), as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _file_bytes(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_adapter_beside_pruned_base_loads_with_plain_peft_like_the_merged_model(tmp_path):
    """Every newer family in both head modes (a layer without attention, one without MLP): the
    pruned base saved, LoRA on it saved as an adapter (`save_adapter`) and, merged, as a recovered
    directory. In a process without the suite the merged directory gives the in-memory merged
    model's logits and `PeftModel.from_pretrained(base, adapter)` the in-memory base + adapter's
    (<= 1e-6 relative), and the merged model's within float rounding of the merge (W x + B A x vs
    (W + B A) x: <= 1e-5); cached decoding equals uncached for both; the base directory is
    unchanged by saving the adapter."""
    import copy
    import json

    settings = recovery.settings_with_defaults({**FAST, "lora_r": 4})
    ids = family_ids(1)
    expected, unmerged, entries, bases = [], [], [], []
    for i, (name, mode) in enumerate(FAMILY_CASES):
        model, plan = pruned_family(name, mode, seed=i)
        base = save_pruned(model, byte_tokenizer(), plan, tmp_path / f"{name}-{mode}")
        before = _file_bytes(base)
        peft_model = recovery.attach_lora(model, settings).eval()  # eval: no LoRA dropout
        _trained_adapter(peft_model, seed=i)
        adapter = recovery.save_adapter(peft_model, base, tmp_path / f"{name}-{mode}-lora", record={"seed": i})
        merged = recovery.merge_lora(copy.deepcopy(peft_model))
        merged_dir = save_pruned(merged, byte_tokenizer(), plan, tmp_path / f"{name}-{mode}-merged")
        with torch.no_grad():
            expected.append(merged(ids).logits)
            unmerged.append(peft_model(input_ids=ids).logits)
        assert _file_bytes(base) == before
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(base.resolve())
        assert {"adapter_model.safetensors", "recovery.json"} <= {p.name for p in adapter.iterdir()}
        entries += [merged_dir, f"{base}+{adapter}"]
        bases.append(base)
    runs = plain_transformers_run(entries, ids, tmp_path, generate=GENERATED)
    for i, case in enumerate(FAMILY_CASES):
        merged_run, pair_run = runs[2 * i: 2 * i + 2]
        assert rel_err(merged_run["logits"], expected[i]) <= 1e-6, case
        assert rel_err(pair_run["logits"], unmerged[i]) <= 1e-6, case
        assert rel_err(pair_run["logits"], expected[i]) <= 1e-5, case
        for run in (merged_run, pair_run):
            assert torch.equal(run["cache0"], run["cache1"]), case
        with torch.no_grad():  # control: the adapter changes the logits
            assert rel_err(load_pruned(bases[i])(ids).logits, expected[i]) > 1e-3, case


def test_adapter_only_setting_is_optional_and_boolean():
    """`adapter_only` is accepted by `suite recover`'s --set and a grid's recovery block; when off it is
    not listed (cells recorded before it existed keep their keys); a non-boolean is a UserError."""
    from suite.pruning.errors import UserError

    assert "adapter_only" not in recovery.settings_with_defaults({"adapter_only": False})
    assert recovery.settings_with_defaults({"adapter_only": True})["adapter_only"] is True
    with pytest.raises(UserError, match="adapter_only must be true or false"):
        recovery.settings_with_defaults({"adapter_only": "yes"})


def test_recover_adapter_only_command_and_eval_of_the_pair(tmp_path, capsys):
    """`suite recover --adapter-only`: PEFT's adapter directory beside the unchanged pruned base; `suite
    eval` reads the pair as `--model BASE --adapter DIR` and as `--model DIR` alike, with the
    perplexity of the base with the adapter merged in this process (and not the base's own)."""
    import json

    from peft import PeftModel

    from suite.cli import main
    from suite.evaluate import perplexity

    model, plan = pruned_tiny("tiny-qwen2")
    base = save_pruned(model, byte_tokenizer(), plan, tmp_path / "pruned", extra={"method": "test"})
    before = _file_bytes(base)
    out = tmp_path / "lora"
    args = ["recover", "--model", str(base), "--out", str(out), "--quiet", "--adapter-only",
            *[a for k, v in FAST.items() for a in ("--set", f"{k}={v}")]]
    assert main(args) == 0
    assert _file_bytes(base) == before  # the base is left as it was
    assert {"adapter_config.json", "adapter_model.safetensors", "recovery.json"} <= {p.name for p in out.iterdir()}
    record = json.loads((out / "recovery.json").read_text())
    assert record["method"] == "test" and record["recovery"]["steps"] == 3
    assert record["recovery"]["settings"]["adapter_only"] is True
    results = []
    for i, pair in enumerate((["--model", str(base), "--adapter", str(out)], ["--model", str(out)])):
        assert main(["eval", *pair, "--ppl", "wikitext2", "--max-tokens", "512", "--quiet",
                     "--json", str(tmp_path / f"{i}.json")]) == 0
        results.append(json.loads((tmp_path / f"{i}.json").read_text()))
    merged = PeftModel.from_pretrained(load_pruned(base), str(out)).merge_and_unload().eval()
    expected = perplexity(merged, byte_tokenizer(), "wikitext2", max_tokens=512, quiet=True)
    own = perplexity(load_pruned(base), byte_tokenizer(), "wikitext2", max_tokens=512, quiet=True)
    for result in results:
        assert result["model"] == str(base) and result["adapter"] == str(out)
        assert abs(result["perplexity"]["wikitext2"] - expected) <= 1e-4 * expected
    assert abs(own - expected) > 1e-3 * expected  # the adapter is applied
    capsys.readouterr()  # an adapter that does not fit its base: one line, exit 2
    assert main(["eval", "--model", "tiny-llama", "--adapter", str(out), "--ppl", "wikitext2", "--quiet"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: adapter")


def test_diverging_recovery_fails_with_one_line_and_no_directory(tmp_path):
    """`suite recover` with a learning rate that blows the weights up: exit 2, `error: ...`, no output dir."""
    model, plan = pruned_tiny("tiny-llama")
    src = save_pruned(model, byte_tokenizer(), plan, tmp_path / "pruned")
    out = tmp_path / "recovered"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-m", "suite", "recover", "--model", str(src), "--out", str(out), "--quiet",
           *[a for k, v in {**FAST, "learning_rate": 1e30}.items() for a in ("--set", f"{k}={v}")]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert lines[-1].startswith("error: recovery diverged") and "Traceback" not in proc.stderr
    assert not out.exists() and not any(p.name.startswith(".recovered") for p in tmp_path.iterdir())


def test_recover_command_writes_a_recovered_pruned_directory(tmp_path):
    """`suite recover` happy path: the output is a pruned directory with the same plan, new weights and
    a `recovery` entry (steps, LoRA, phase time and peak) in pruning.json."""
    import json

    model, plan = pruned_tiny("tiny-opt")
    src = save_pruned(model, byte_tokenizer(), plan, tmp_path / "pruned", extra={"method": "test"})
    out = tmp_path / "recovered"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-m", "suite", "recover", "--model", str(src), "--out", str(out), "--quiet",
           "--max-steps", "1", *[a for k, v in FAST.items() if k != "max_steps" for a in ("--set", f"{k}={v}")]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "plan.json").read_text() == (src / "plan.json").read_text()
    record = json.loads((out / "pruning.json").read_text())
    assert record["method"] == "test" and record["recovery"]["steps"] == 1
    assert record["recovery"]["settings"]["learning_rate"] == FAST["learning_rate"]
    assert {"seconds", "peak_mb"} <= set(record["recovery"]["phase"])
    before, after = load_pruned(src).state_dict(), load_pruned(out).state_dict()
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)


def test_bad_settings_are_user_errors():
    from suite.pruning.errors import UserError

    with pytest.raises(UserError, match="unknown recovery setting"):
        recovery.settings_with_defaults({"lora_rank": 8})
    with pytest.raises(UserError, match="multiple of micro_batch_size"):
        recovery.settings_with_defaults({"batch_size": 6, "micro_batch_size": 4})
    with pytest.raises(UserError, match="leaves no training data"):
        recovery.split_train_val(list(range(10)), 10)


def test_alpaca_labels_mask_the_prompt():
    tok = byte_tokenizer()
    settings = recovery.settings_with_defaults(FAST | {"cutoff_len": 4096})
    row = {"instruction": "Add.", "input": "2+2", "output": "4"}
    ex = recovery.tokenize_instruction(tok, row, settings)
    prompt = ("Below is an instruction that describes a task, paired with an input that provides further "
              "context. Write a response that appropriately completes the request.\n\n### Instruction:\nAdd."
              "\n\n### Input:\n2+2\n\n### Response:\n")
    n_prompt = len(tok(prompt)["input_ids"])
    assert ex["input_ids"] == tok(prompt + "4")["input_ids"] + [tok.eos_token_id]
    assert ex["labels"] == [-100] * n_prompt + ex["input_ids"][n_prompt:]


# --------------------------------------------------------------------------- grids, records, tables
GRID = """name: t
models: [tiny-llama]
methods:
  - magnitude
  - {name: random, recovery: {lora_r: 4}}
  - {name: wanda-sp, recovery: false}
ratios: [0.2, 0.5]
recovery: {ratios: [0.2], max_steps: 30, data: tatsu-lab/alpaca}
"""


def test_grid_recovery_block_per_method_and_ratio(tmp_path):
    import hashlib

    from suite.config import expand_cells, load_config
    from suite.records import CELL_KEYS, canonical_json, cell_key

    (tmp_path / "c.yaml").write_text(GRID)
    cells = {(c["method"], c["ratio"]): c for c in expand_cells(load_config(tmp_path / "c.yaml"))}
    defaults = recovery.DEFAULTS
    assert cells[("magnitude", 0.2)]["recovery"] == {**defaults, "max_steps": 30, "data": "tatsu-lab/alpaca"}
    assert cells[("random", 0.2)]["recovery"] == {**defaults, "max_steps": 30, "data": "tatsu-lab/alpaca", "lora_r": 4}
    for key in [("magnitude", 0.5), ("random", 0.5), ("wanda-sp", 0.2), ("dense", 0.0)]:
        assert "recovery" not in cells[key]
        # a cell without recovery keeps the key it had before recovery existed
        legacy = hashlib.sha256(canonical_json({k: cells[key].get(k) for k in CELL_KEYS}).encode()).hexdigest()
        assert cell_key(cells[key]) == legacy
    plain = dict(cells[("magnitude", 0.2)])
    del plain["recovery"]
    assert cell_key(plain) != cell_key(cells[("magnitude", 0.2)])  # the key includes the recovery settings
    (tmp_path / "bad.yaml").write_text(GRID.replace("max_steps: 30", "max_step: 30"))
    from suite.pruning.errors import UserError

    with pytest.raises(UserError, match=r"bad.yaml: recovery: unknown recovery setting\(s\) max_step"):
        load_config(tmp_path / "bad.yaml")


def test_grid_adapter_only_cell_evaluates_base_plus_adapter_as_merged(tmp_path):
    """A grid's `recovery: {adapter_only: true}`: the cell names the setting (its key differs), trains
    the same LoRA and evaluates the unmerged base + adapter, with the merged cell's perplexity."""
    from suite.config import expand_cells, load_config
    from suite.pipeline import run_cell
    from suite.records import cell_key

    (tmp_path / "c.yaml").write_text(GRID.replace("data: tatsu-lab/alpaca}", "data: tatsu-lab/alpaca, adapter_only: true}"))
    cells = {(c["method"], c["ratio"]): c for c in expand_cells(load_config(tmp_path / "c.yaml"))}
    assert cells[("magnitude", 0.2)]["recovery"]["adapter_only"] is True
    cell = {"model": "tiny-llama", "method": "magnitude", "label": "magnitude", "options": {}, "ratio": 0.2,
            "seed": 0, "calibration": {}, "device": "cpu", "dtype": "float32",
            "evaluation": {"perplexity": ["wikitext2"], "max_tokens": 512, "tasks": [], "throughput": False},
            "recovery": recovery.settings_with_defaults(FAST)}
    pair = dict(cell, recovery=recovery.settings_with_defaults({**FAST, "adapter_only": True}))
    assert cell_key(pair) != cell_key(cell)
    merged, unmerged = run_cell(cell)["perplexity"]["wikitext2"], run_cell(pair)
    assert unmerged["recovery"]["settings"]["adapter_only"] is True
    assert abs(unmerged["perplexity"]["wikitext2"] - merged) <= 1e-5 * merged
    assert abs(unmerged["before_recovery"]["perplexity"]["wikitext2"] - merged) > 1e-3 * merged  # it trained


def test_recovered_cell_record_and_table_rows():
    """A recovered cell records metrics before and after; the table shows them as w/o / w/ tune rows."""
    from suite.pipeline import run_cell
    from suite.tables import to_csv, to_markdown

    cell = {"model": "tiny-llama", "method": "magnitude", "label": "magnitude", "options": {}, "ratio": 0.2,
            "seed": 0, "calibration": {}, "device": "cpu", "dtype": "float32",
            "evaluation": {"perplexity": ["wikitext2"], "max_tokens": 1024, "tasks": [], "throughput": False},
            "recovery": recovery.settings_with_defaults(FAST)}
    record = run_cell(cell)
    before, after = record["before_recovery"]["perplexity"]["wikitext2"], record["perplexity"]["wikitext2"]
    assert before != after
    assert record["recovery"]["steps"] == 3 and record["recovery"]["settings"] == cell["recovery"]
    assert record["recovery"]["lora"]["targets"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj",
                                                            "gate_proj", "up_proj", "down_proj"])
    assert {"seconds", "peak_mb"} <= set(record["phases"]["recover"])
    record.update(status="ok", cell=cell)
    import io

    import pandas as pd

    frame = pd.read_csv(io.StringIO(to_csv([record])))
    rows = dict(zip(frame["Method"], frame["WikiText-2"]))
    assert rows == {"magnitude w/o tune": pytest.approx(before), "magnitude w/ tune": pytest.approx(after)}
    assert "magnitude w/ tune" in to_markdown([record])
    from suite.plots import _perplexity, _series

    series = _series([record], _perplexity("wikitext2"))  # the plot: pruned value on the method's line, recovered on its own
    from suite.plots import _score_memory

    memory = _score_memory([record])  # scoring ran once: one bar, on the pruned (w/o tune) row's line
    assert list(memory) == [("tiny-llama", "magnitude")]
    assert memory[("tiny-llama", "magnitude")][0.2][1] == record["phases"]["score"]["peak_mb"]
    assert series == {("tiny-llama", "magnitude"): {0.2: [before]}, ("tiny-llama", "magnitude w/ tune"): {0.2: [after]}}


def test_c4_recovery_documents_avoid_calibration_and_heldout():
    from suite.data import C4_HELDOUT_DOCS, c4_recovery_documents, calibration_windows, load_rows

    tok = byte_tokenizer()
    calib = {"corpus": "c4", "nsamples": 4, "seqlen": 64}
    recovery_docs = c4_recovery_documents(tok, calib, seed=3)
    docs = [r["text"] for r in load_rows("allenai/c4", "en", "train")]
    pool, heldout = docs[:-C4_HELDOUT_DOCS], docs[-C4_HELDOUT_DOCS:]
    assert len(pool) - 4 <= len(recovery_docs) < len(pool)
    assert not set(heldout) & set(recovery_docs)
    for window in calibration_windows(tok, "c4", 4, 64, seed=3):  # each window's document is left out
        text = tok.decode(window.tolist())
        assert any(text in d for d in pool) and not any(text in d for d in recovery_docs)
