"""Standard pruned checkpoints: a directory written by `save_pruned` loads with plain transformers
(`trust_remote_code=True`, in a process where the suite is not importable) and gives the logits of
the suite's in-memory pruned model; the suite's own loader reads it and the older format."""
import json
import os
import subprocess
import sys

import pytest
import torch

from suite.pruning.architectures import adapter_for
from suite.pruning.plan import apply_plan
from suite.pruning.saving import load_pruned, save_pruned
from suite.models import byte_tokenizer
from tests.checkpoints import HIDE_SUITE, heterogeneous_plan, plain_transformers_logits, pruned_tiny
from tests.reference import rel_err

TINY = ["tiny-llama", "tiny-llama-gqa", "tiny-opt", "tiny-bloom"]


def test_plain_transformers_loads_pruned_tiny(tmp_path):
    ids = torch.randint(3, 259, (2, 20), generator=torch.Generator().manual_seed(0))
    models, dirs = [], []
    for name in TINY:
        model, plan = pruned_tiny(name)
        models.append(model)
        dirs.append(save_pruned(model, byte_tokenizer(), plan, tmp_path / name))
    plain = plain_transformers_logits(dirs, ids, tmp_path)
    for name, model, logits, d in zip(TINY, models, plain, dirs):
        with torch.no_grad():
            expected = model(ids).logits
        assert logits.shape == expected.shape
        assert rel_err(logits, expected) <= 1e-6, name
        again = load_pruned(d)  # the suite's loader reads the same directory
        with torch.no_grad():
            assert torch.equal(again(ids).logits, expected), name
        config = json.loads((d / "config.json").read_text())
        adapter = adapter_for(model)
        for spec, layer in zip(config["pruned_layers"], adapter.layers(model)):  # sizes as sliced
            assert (spec["heads"], spec["kv_heads"], spec["channels"]) == (
                adapter.num_heads(layer), adapter.num_kv_heads(layer), adapter.num_channels(layer))
        assert config["pruned_layers"][1]["heads"] == 0  # a layer with its whole attention removed


@pytest.mark.parametrize("name", ["tiny-llama-gqa", "tiny-bloom"])
def test_old_format_directory_still_loads(tmp_path, name):
    """A directory of the earlier format (dense config + plan.json, no pruned_layers) loads as before."""
    model, plan = pruned_tiny(name)
    out = save_pruned(model, byte_tokenizer(), plan, tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    for key in ("pruned_layers", "auto_map"):
        del config[key]
    (out / "config.json").write_text(json.dumps(config))
    (out / "modeling_pruned.py").unlink()
    ids = torch.randint(3, 259, (1, 16))
    with torch.no_grad():
        assert torch.equal(load_pruned(out)(ids).logits, model(ids).logits)


RSS_SCRIPT = r"""
import resource, sys, torch
import transformers, safetensors, suite.pruning.saving, suite.pruning.modeling_pruned  # the baseline imports everything
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = suite.pruning.saving.load_pruned(sys.argv[1])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
size = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights once
print(base * 1024, peak * 1024, size)
"""


@pytest.mark.slow
def test_smollm2_pruned_directory_plain_transformers_and_rss(tmp_path, smollm2):
    """SmolLM2: plain-transformers logits equal the in-memory model's; reloading keeps peak RSS below
    1.3x the pruned model's bytes plus the interpreter's baseline (a fresh process: nothing dense)."""
    import copy

    model = copy.deepcopy(smollm2[0])
    plan = heterogeneous_plan(model, seed=1, empty_attention_layer=5)
    apply_plan(model, plan)
    out = save_pruned(model, smollm2[1], plan, tmp_path / "smol")
    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))
    (plain,) = plain_transformers_logits([out], ids, tmp_path)
    with torch.no_grad():
        expected = model(ids).logits
    assert rel_err(plain, expected) <= 1e-6
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(os.getcwd()), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(out)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    base, peak, size = map(int, proc.stdout.split()[-3:])
    assert size < sum(p.numel() * 4 for p in smollm2[0].parameters())  # pruned is smaller than dense
    assert peak <= base + 1.3 * size, (base, peak, size)


@pytest.mark.slow
def test_lm_eval_cli_evaluates_pruned_smollm2_like_suite_eval(tmp_path, smollm2):
    """`lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True` (its own CLI, in a process
    without the suite) on mirrored ARC-Easy items gives `suite eval`'s accuracy on the same items."""
    import copy

    import yaml

    from suite.data import mirror_root
    from suite.evaluate import mirror_task_config, task_manager

    model = copy.deepcopy(smollm2[0])
    plan = heterogeneous_plan(model, seed=2, empty_attention_layer=3)
    apply_plan(model, plan)
    out = save_pruned(model, smollm2[1], plan, tmp_path / "smol")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    cfg = mirror_task_config(task_manager(tasks=("arc_easy",)), "arc_easy", mirror_root())
    cfg.update(task="arc_easy_mirror")
    cfg.pop("tag", None)
    (tasks / "arc_easy_mirror.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    cli = [sys.executable, "-I", "-c", HIDE_SUITE + "from lm_eval.__main__ import cli_evaluate\n"
           "sys.argv[0] = 'lm_eval'\nsys.exit(cli_evaluate())",
           "--model", "hf", "--model_args", f"pretrained={out},trust_remote_code=True,dtype=float32",
           "--tasks", "arc_easy_mirror", "--include_path", str(tasks), "--limit", "40", "--batch_size", "4",
           "--device", "cpu", "--output_path", str(tmp_path / "lm_eval_out")]
    proc = subprocess.run(cli, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result_file,) = (tmp_path / "lm_eval_out").rglob("results_*.json")
    cli_acc = json.loads(result_file.read_text())["results"]["arc_easy_mirror"]["acc,none"]
    suite_env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "suite", "eval", "--model", str(out), "--ppl", "none",
                           "--tasks", "arc_easy", "--limit", "40", "--batch-size", "4", "--quiet",
                           "--json", str(tmp_path / "suite.json")], capture_output=True, text=True, env=suite_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    suite_acc = json.loads((tmp_path / "suite.json").read_text())["zero_shot"]["arc_easy"]["acc"]
    assert cli_acc == suite_acc


def test_family_without_pruned_class_saves_and_loads_as_before(tmp_path, monkeypatch):
    """An architecture adapter whose family modeling_pruned.py does not list: dense config + plan.json, sliced on load."""
    from suite.pruning import modeling_pruned

    monkeypatch.delitem(modeling_pruned.FAMILIES, "opt")
    model, plan = pruned_tiny("tiny-opt")
    out = save_pruned(model, byte_tokenizer(), plan, tmp_path / "m")
    assert not (out / "modeling_pruned.py").exists()
    assert "pruned_layers" not in json.loads((out / "config.json").read_text())
    ids = torch.randint(3, 259, (1, 16))
    with torch.no_grad():
        assert torch.equal(load_pruned(out)(ids).logits, model(ids).logits)


SLICED = ["tiny-llama-gqa", "tiny-qwen3", "tiny-phi3", "tiny-opt"]


def test_residual_sliced_directory_loads_in_plain_transformers_with_equal_logits(tmp_path):
    """SliceGPT (suite/pruning/rotation.py): config states every width, modeling_sliced.py adds the
    shortcut matrices; plain transformers and the suite's loader give the in-memory model's logits."""
    from suite.models import load_model
    from suite.pruning.plan import full_plan
    from suite.pruning.rotation import rotate_and_slice
    from tests.tiny import token_ids

    ids = token_ids(2, 20, seed=4)
    models, dirs = [], []
    for name in SLICED:
        model = load_model(name).eval()
        rotate_and_slice(model, token_ids(3, 16, seed=1), 88, slice_head=(name == "tiny-opt"))
        models.append(model)
        dirs.append(save_pruned(model, byte_tokenizer(), full_plan(model), tmp_path / name))
    plain = plain_transformers_logits(dirs, ids, tmp_path)
    for name, model, logits, d in zip(SLICED, models, plain, dirs):
        with torch.no_grad():
            expected = model(ids).logits
        assert rel_err(logits, expected) <= 1e-6, name
        again = load_pruned(d)
        with torch.no_grad():
            assert torch.equal(again(ids).logits, expected), name
        config = json.loads((d / "config.json").read_text())
        assert config["residual_widths"][0] == 88 and config["tie_word_embeddings"] is False
        assert (d / "modeling_sliced.py").is_file() and not (d / "modeling_pruned.py").exists()
        assert again.get_input_embeddings().weight.shape[1] == 88
