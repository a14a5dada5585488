"""Standard pruned checkpoints: a directory written by `save_pruned` loads with plain transformers
(`trust_remote_code=True`, in a process where the suite is not importable) and gives the logits of
the suite's in-memory pruned model; the suite's own loader reads it and the older format."""
import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from suite.pruning.architectures import adapter_for
from suite.pruning.plan import apply_plan
from suite.pruning.saving import load_pruned, save_pruned
from suite.pruning.select import select
from suite.models import byte_tokenizer, load_model
from tests.checkpoints import (EMPTY_ATTENTION, FAMILIES, FAMILY_CASES, GENERATED, HIDE_SUITE, family_ids,
                               heterogeneous_plan, plain_transformers_logits, plain_transformers_run, pruned_family,
                               pruned_tiny)
from tests.reference import rel_err
from tests.tiny import numel, random_scores

TINY = ["tiny-llama", "tiny-llama-gqa", "tiny-opt", "tiny-bloom"]


def assert_sizes_in_config(model, out):
    """`pruned_layers` of the saved config states every layer's sizes as the in-memory model has them."""
    config = json.loads((out / "config.json").read_text())
    adapter = adapter_for(model)
    assert len(config["pruned_layers"]) == len(adapter.layers(model))
    for spec, layer in zip(config["pruned_layers"], adapter.layers(model)):
        assert (spec["heads"], spec["kv_heads"], spec["channels"]) == (
            adapter.num_heads(layer), adapter.num_kv_heads(layer), adapter.num_channels(layer))
    return config


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


def test_newer_families_load_with_plain_transformers_and_decode_alike(tmp_path):
    """Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3, Phi-3 in both head modes (kv-group where a layer has
    >= 2 kv heads): a random non-uniform plan with one layer without attention (layer 1 in q-head
    mode; layer 0 in kv-group mode, whose cache entry sets the cached length) and layer 2 without MLP,
    saved, loads in a process without the suite with the in-memory logits (<= 1e-6 relative); the
    suite's loader gives them too; greedy decoding past the sliding window is the same with and
    without the KV cache."""
    ids = family_ids()
    models, dirs = [], []
    for name, mode in FAMILY_CASES:
        model, plan = pruned_family(name, mode, seed=len(dirs))
        models.append(model)
        dirs.append(save_pruned(model, byte_tokenizer(), plan, tmp_path / f"{name}-{mode}"))
    runs = plain_transformers_run(dirs, ids, tmp_path, generate=GENERATED)
    for (name, mode), model, run, d in zip(FAMILY_CASES, models, runs, dirs):
        with torch.no_grad():
            expected = model(ids).logits
            assert torch.equal(load_pruned(d)(ids).logits, expected), (name, mode)
        assert run["logits"].shape == expected.shape
        assert rel_err(run["logits"], expected) <= 1e-6, (name, mode)
        assert run["cache1"].shape == (2, 20 + GENERATED) and torch.equal(run["cache1"][:, :20], ids)
        assert torch.equal(run["cache1"], run["cache0"]), (name, mode)
        config = assert_sizes_in_config(model, d)
        assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_pruned.Pruned")
        layers = config["pruned_layers"]
        assert layers[EMPTY_ATTENTION[mode]]["heads"] == 0  # whole attention removed
        assert layers[2]["channels"] == 0  # whole MLP removed
        assert len({(s["heads"], s["kv_heads"], s["channels"]) for s in layers}) == len(layers)  # non-uniform
        if name == "tiny-qwen2":  # its q/k/v biases kept, per layer
            assert all({"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"} <= set(s["biases"])
                       for s in layers)
        if mode == "kv-group":
            assert any(s["kv_heads"] < model.config.num_key_value_heads for s in layers)


def assert_config_features_survive(tmp_path, name, kept: dict, variants: dict):
    """A pruned `name` saved: its config holds `kept` (key -> value), and its logits reloaded in a process
    without the suite equal the in-memory model's (<= 1e-6) while the same directory with each of
    `variants` (label -> config change) gives logits > 1e-3 away: a save that dropped or changed one of
    those settings would fail the first check."""
    model, plan = pruned_tiny(name)
    out = save_pruned(model, byte_tokenizer(), plan, tmp_path / name)
    config = json.loads((out / "config.json").read_text())
    assert {key: config.get(key) for key in kept} == kept
    dirs = [out]
    for label, change in variants.items():
        d = tmp_path / label.replace(" ", "-")
        shutil.copytree(out, d)
        (d / "config.json").write_text(json.dumps({**config, **change}))
        dirs.append(d)
    ids = torch.randint(3, 259, (1, 40), generator=torch.Generator().manual_seed(3))  # 40 > the 16-token window
    reloaded, *changed = plain_transformers_logits(dirs, ids, tmp_path)
    with torch.no_grad():
        expected = model(ids).logits
    assert rel_err(reloaded, expected) <= 1e-6
    for label, logits in zip(variants, changed):
        assert rel_err(logits, expected) > 1e-3, label


def test_gemma2_soft_capping_and_sliding_window_survive_save_and_reload(tmp_path):
    """Gemma 2 keeps attention and final-logit soft capping and its alternating sliding / full layers."""
    assert_config_features_survive(
        tmp_path, "tiny-gemma2",
        kept={"layer_types": ["sliding_attention", "full_attention"] * 2, "sliding_window": 16,
              "attn_logit_softcapping": 20.0, "final_logit_softcapping": 3.0},
        variants={"no attention cap": {"attn_logit_softcapping": None},
                  "no final cap": {"final_logit_softcapping": None},
                  "no sliding layers": {"layer_types": ["full_attention"] * 4}})


def test_gemma3_rope_bases_and_local_global_pattern_survive_save_and_reload(tmp_path):
    """Gemma 3 keeps its local (sliding, rope base 1e4) / global (full, rope base 1e6) layers."""
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}
    assert_config_features_survive(
        tmp_path, "tiny-gemma3",
        kept={"layer_types": ["sliding_attention", "full_attention"] * 2, "sliding_window": 16,
              "rope_parameters": rope},
        variants={"one rope base": {"rope_parameters": {**rope, "sliding_attention": rope["full_attention"]}},
                  "no local layers": {"layer_types": ["full_attention"] * 4}})


@pytest.mark.parametrize("name", ["tiny-llama-gqa", "tiny-bloom", *FAMILIES])
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


def lm_eval_cli_accuracy(model_dir, task, limit, tmp_path) -> float:
    """`acc` of `lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True` (its own CLI, in a
    process without the suite) on `task` redirected to the mirror (a task YAML `<task>_mirror` written
    from `suite.evaluate.mirror_task_config`, read with --include_path), first `limit` items."""
    import yaml

    from suite.data import mirror_root
    from suite.evaluate import mirror_task_config, task_manager

    tasks = tmp_path / "tasks"
    tasks.mkdir(exist_ok=True)
    cfg = mirror_task_config(task_manager(tasks=(task,)), task, mirror_root())
    cfg.update(task=f"{task}_mirror")
    cfg.pop("tag", None)
    (tasks / f"{task}_mirror.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    output = tmp_path / f"lm_eval_out-{Path(model_dir).name}"
    cli = [sys.executable, "-I", "-c", HIDE_SUITE + "from lm_eval.__main__ import cli_evaluate\n"
           "sys.argv[0] = 'lm_eval'\nsys.exit(cli_evaluate())",
           "--model", "hf", "--model_args", f"pretrained={model_dir},trust_remote_code=True,dtype=float32",
           "--tasks", f"{task}_mirror", "--include_path", str(tasks), "--limit", str(limit), "--batch_size", "4",
           "--device", "cpu", "--output_path", str(output)]
    proc = subprocess.run(cli, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result_file,) = output.rglob("results_*.json")
    return json.loads(result_file.read_text())["results"][f"{task}_mirror"]["acc,none"]


def suite_eval_accuracy(model_dir, task, limit, tmp_path) -> float:
    """`acc` of `suite eval --model DIR --tasks TASK --limit LIMIT` (the suite's CLI, in this process)."""
    from suite.cli import main

    out = tmp_path / f"suite-{Path(model_dir).name}.json"
    assert main(["eval", "--model", str(model_dir), "--ppl", "none", "--tasks", task, "--limit", str(limit),
                 "--batch-size", "4", "--quiet", "--json", str(out)]) == 0
    return json.loads(out.read_text())["zero_shot"][task]["acc"]


@pytest.mark.slow
def test_lm_eval_cli_evaluates_pruned_smollm2_like_suite_eval(tmp_path, smollm2):
    """`lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True` (its own CLI, in a process
    without the suite) on mirrored ARC-Easy items gives `suite eval`'s accuracy on the same items."""
    import copy

    model = copy.deepcopy(smollm2[0])
    plan = heterogeneous_plan(model, seed=2, empty_attention_layer=3)
    apply_plan(model, plan)
    out = save_pruned(model, smollm2[1], plan, tmp_path / "smol")
    assert lm_eval_cli_accuracy(out, "arc_easy", 40, tmp_path) == suite_eval_accuracy(out, "arc_easy", 40, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-gemma2"])
def test_lm_eval_cli_evaluates_pruned_newer_family_like_suite_eval(tmp_path, name):
    """A pruned tiny Qwen2 / Gemma 2 directory (a layer without attention, one without MLP): lm-eval's own
    CLI in a process without the suite gives `suite eval`'s ARC-Easy accuracy on the same 40 items, a
    mix of right and wrong answers (an accuracy of 0 or 1 would match however the models differed)."""
    model, plan = pruned_family(name, "q-head")
    out = save_pruned(model, byte_tokenizer(), plan, tmp_path / name)
    cli = lm_eval_cli_accuracy(out, "arc_easy", 40, tmp_path)
    assert cli == suite_eval_accuracy(out, "arc_easy", 40, tmp_path)
    assert 0 < cli < 1


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


# --------------------------------------------------------------------------- save and reload
@pytest.mark.parametrize("name", ["tiny-llama-gqa", "tiny-opt", "tiny-bloom"])
def test_saved_model_reloads_with_identical_logits_and_no_pickle(tmp_path, name):
    model = load_model(name)
    sel = select(model, random_scores(model), 0.3, layers=[0, 2, 3])
    apply_plan(model, sel.plan)
    if name == "tiny-llama-gqa":  # a bias created by pruning (FLAP compensation) must survive
        o = model.model.layers[0].self_attn.o_proj
        o.bias = torch.nn.Parameter(torch.randn(o.out_features))
    out = save_pruned(model, byte_tokenizer(), sel.plan, tmp_path / "pruned")
    files = {p.name for p in out.iterdir()}
    assert "plan.json" in files and any(f.endswith(".safetensors") for f in files)
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle")) for f in files)
    again = load_model(str(out))
    ids = torch.randint(3, 259, (2, 24))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    assert numel(again) == numel(model)


def test_saved_smollm2_keeps_its_tied_embeddings_and_logits(tmp_path, smollm2):
    model = copy.deepcopy(smollm2[0])
    sel = select(model, random_scores(model), 0.2, layers=list(range(4, 28)))
    apply_plan(model, sel.plan)
    out = save_pruned(model, smollm2[1], sel.plan, tmp_path / "smol")
    again = load_model(str(out))
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 49152, (1, 32))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


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
