"""`--offload`: models larger than the device (suite/offload.py, suite/pruning/layerwise.py `materialised`);
the offload settings in the record; `--hidden-on`, where the layer pass keeps the hidden states.

The CPU stands in for the device: a tiny model saved to a temporary directory is loaded with
`offload="disk"` and a cap on "device" memory smaller than the model, so accelerate keeps some (or
no) decoder layers in memory and the rest in memory-mapped files. The reference is the same model
loaded normally: the kept heads/channels, the pruned logits, the perplexity and the saved pruned
model must be the same.
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from suite.pruning.architectures import adapter_for, all_group_sets
from suite.pruning.errors import UserError
from suite.pruning.layerwise import materialised, offloaded
from suite.models import _tiny_model, byte_tokenizer, count_parameters, load_model
from tests.cli_output import one_line_error
from tests.grids import load_grid

ROOT = Path(__file__).resolve().parents[1]

CALIB = {"corpus": "c4", "nsamples": 4, "seqlen": 32}
CALIB_ARGS = ["--nsamples", "4", "--seqlen", "32"]
CAP = {"tiny-llama": 6_000_000, "tiny-opt": 5_000_000, "tiny-bloom": 2_000_000}  # bytes; models are 8-14 MB


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> a directory holding the seeded tiny model's safetensors (built once per module)."""
    dirs = {}

    def get(name):
        if name not in dirs:
            path = tmp_path_factory.mktemp(name)
            _tiny_model(name).save_pretrained(path)
            byte_tokenizer().save_pretrained(path)
            dirs[name] = path
        return dirs[name]

    return get


def _bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _offloaded(path, name, tmp_path):
    model = load_model(str(path), offload="disk", device_memory=CAP[name], offload_folder=tmp_path / "off")
    assert "disk" in set(model.hf_device_map.values())
    assert any(offloaded(layer) for layer in adapter_for(model).layers(model))
    return model


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt", "tiny-bloom"])
@pytest.mark.parametrize("method,options", [("wanda-sp", {}), ("flap", {}), ("magnitude", {}),
                                            ("llm-pruner", {"layers": "all"}), ("minillm", {}), ("shortgpt", {}),
                                            ("sleb", {}),
                                            ("bonsai", {"options": {"masks_per_iter": 4, "prune_frac": 0.15,
                                                                    "sm_lr_factor": [1.0], "sm_bsz": [32],
                                                                    "sm_reg_weight": [1e-4], "sm_nepochs": 3}})])
def test_offloaded_pruning_equals_resident(saved, tmp_path, name, method, options):
    from suite.pipeline import prune

    path, tok = saved(name), byte_tokenizer()
    ref = load_model(str(path))
    assert _bytes(ref) > CAP[name]
    off = _offloaded(path, name, tmp_path)
    assert count_parameters(off) == count_parameters(ref)  # meta parameters counted by shape
    common = {k: options[k] for k in ("layers", "options") if k in options}
    a = prune(ref, tok, method, 0.3, calib=CALIB, **common)
    b = prune(off, tok, method, 0.3, calib=CALIB, hidden_on="cpu", **common)
    assert b.selection.plan.to_json() == a.selection.plan.to_json()
    assert (b.params_dense, b.params_pruned) == (a.params_dense, a.params_pruned)
    ids = torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(off(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)


def test_offloaded_flap_perplexity_lm_eval_save_and_reload(saved, tmp_path):
    from suite.pruning.plan import carried_plan
    from suite.pruning.saving import save_pruned
    from suite import evaluate
    from suite.pipeline import prune

    name = "tiny-llama"
    path, tok = saved(name), byte_tokenizer()
    ref, off = load_model(str(path)), _offloaded(path, name, tmp_path)
    source = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in path.glob("*.safetensors")}
    prune(ref, tok, "flap", 0.3, calib=CALIB)
    outcome = prune(off, tok, "flap", 0.3, calib=CALIB)
    assert outcome.scoring.info["bias_entries_added"] > 0  # LLaMA: biases created on offloaded layers
    ppl = [evaluate.perplexity(m, tok, "wikitext2", max_tokens=512, quiet=True) for m in (ref, off)]
    assert ppl[1] == pytest.approx(ppl[0], rel=1e-6)
    acc = [evaluate.zero_shot(m, tok, ["piqa"], limit=6, quiet=True)["piqa"] for m in (ref, off)]  # lm-eval's HFLM
    assert acc[1] == acc[0]
    save_pruned(off, tok, carried_plan(off), tmp_path / "pruned")
    reloaded = load_model(str(tmp_path / "pruned"))
    again = load_model(str(tmp_path / "pruned"), offload="disk", device_memory=2_000_000,
                       offload_folder=tmp_path / "off2")  # a pruned directory, dispatched offloaded
    assert any(offloaded(layer) for layer in again.model.layers)
    ids = torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(again(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)
    # the model's own files were never written: changes went to the offload folder
    assert source == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in path.glob("*.safetensors")}


def test_materialised_writes_back_only_changes(saved, tmp_path):
    """Slicing (a new Parameter), an in-place edit and a new bias reach the offload storage; an
    untouched weight is not rewritten; outside the block the weights are meta again."""
    name = "tiny-llama"
    path = saved(name)
    ref = load_model(str(path))
    off = load_model(str(path), offload="disk", device_memory=CAP[name], offload_folder=tmp_path / "off")
    layer, dense = off.model.layers[3], ref.model.layers[3]
    assert offloaded(layer) and layer.mlp.down_proj.weight.device.type == "meta"
    keep = torch.tensor([0, 5, 9])
    with materialised(layer):
        assert not offloaded(layer)  # inside: resident (nested blocks are no-ops)
        torch.testing.assert_close(layer.mlp.down_proj.weight, dense.mlp.down_proj.weight, rtol=0, atol=0)
        down = layer.mlp.down_proj
        down.weight = torch.nn.Parameter(down.weight[:, keep].clone())
        down.in_features = 3
        with torch.no_grad():
            layer.self_attn.q_proj.weight.mul_(2.0)
        down.bias = torch.nn.Parameter(torch.arange(down.out_features, dtype=down.weight.dtype))
    assert offloaded(layer) and layer.mlp.down_proj.weight.device.type == "meta"
    folder = tmp_path / "off"
    assert (folder / "model.layers.3.mlp.down_proj.weight.dat").is_file()
    assert not (folder / "model.layers.3.mlp.up_proj.weight.dat").exists()  # unchanged: not rewritten
    with materialised(layer):
        torch.testing.assert_close(layer.mlp.down_proj.weight, dense.mlp.down_proj.weight[:, keep], rtol=0, atol=0)
        torch.testing.assert_close(layer.self_attn.q_proj.weight, 2.0 * dense.self_attn.q_proj.weight, rtol=0, atol=0)
        assert torch.equal(layer.mlp.down_proj.bias, torch.arange(dense.mlp.down_proj.out_features,
                                                                  dtype=torch.float32))
        torch.testing.assert_close(layer.mlp.up_proj.weight, dense.mlp.up_proj.weight, rtol=0, atol=0)


def test_methods_not_offloadable_yet_are_refused(saved, tmp_path):
    from suite.pipeline import prune

    off = _offloaded(saved("tiny-llama"), "tiny-llama", tmp_path)
    for options in ({"perturb": "all"}, {"gradient": "backprop"}, {"space": "mask"}, {"space": "layer"}):
        with pytest.raises(UserError, match="minillm .* does not run with --offload"):
            prune(off, byte_tokenizer(), "minillm", 0.3, options=options, calib=CALIB)
    with pytest.raises(UserError, match="importance=element2 .*does not run with --offload"):
        prune(off, byte_tokenizer(), "llm-pruner", 0.3, options={"importance": "element2"}, calib=CALIB)


@pytest.mark.parametrize("kwargs,message", [
    ({"offload": "ram"}, "offload 'ram'"),
    ({"offload": "cpu"}, "use --offload disk"),
    ({"offload": "disk", "device_memory": "lots"}, "device memory 'lots'"),
    ({"device_memory": "2GB"}, "need --offload"),
])
def test_bad_offload_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        load_model("tiny-llama", **kwargs)


def test_used_offload_folder_is_refused(tmp_path):
    """A folder an earlier run wrote (accelerate would silently reuse its weights) is refused."""
    load_model("tiny-llama", offload="disk", device_memory=3_000_000, offload_folder=tmp_path / "o")
    assert any((tmp_path / "o").iterdir())
    with pytest.raises(UserError, match="not an empty directory"):
        load_model("tiny-llama", offload="disk", device_memory=3_000_000, offload_folder=tmp_path / "o")


def test_offload_config_keys(tmp_path):
    from suite.config import expand_cells, grid_identity, validate
    from suite.records import cell_key

    base = {"name": "g", "models": ["tiny-llama"], "methods": ["wanda-sp"], "ratios": [0.2]}
    plain = validate(dict(base))
    offl = validate({**base, "offload": "disk", "device_memory": "64MB", "hidden_on": "cpu"})
    assert grid_identity(offl) == grid_identity(plain)  # cannot change results: same grid, same cells
    assert [cell_key(c) for c in expand_cells(offl)] == [cell_key(c) for c in expand_cells(plain)]
    assert all(c["offload"] == "disk" and c["hidden_on"] == "cpu" for c in expand_cells(offl))
    for bad, message in [({"device_memory": "1GB"}, "device_memory: needs offload"),
                         ({"offload": "cpu"}, "offload: cpu keeps weights"),
                         ({"offload": "disk", "device_memory": "-3"}, "device_memory"),
                         ({"hidden_on": "gpu"}, "hidden_on"),
                         ({"offload": "disk", "methods": ["wanda-sp", {"name": "minillm",
                                                                       "options": {"perturb": "all"}}]},
                          r"methods\[1\]: minillm perturb=all .* does not run with offload")]:
        with pytest.raises(UserError, match=message):
            validate({**base, **bad})


def test_cli_bad_size_is_one_line_exit_2(tmp_path):
    import os

    env = {**os.environ, "PYTHONPATH": str(__import__("pathlib").Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "suite", "prune", "--model", "tiny-llama", "--method", "magnitude",
                           "--ratio", "0.2", "--out", str(tmp_path / "o"), "--offload", "disk",
                           "--device-memory", "12 bananas"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: device memory '12 bananas': expected a size such as 24GB, 512MiB or a byte count"]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("source", ["directory", "built in code"])
def test_offloaded_bfloat16_keeps_fp32_rotary_and_equal_logits(saved, tmp_path, source):
    """Both loading routes (from_pretrained with a device map; dispatch_model of a model built in
    code) keep LLaMA's rotary inv_freq in float32 (suite/precision.py) and give the resident logits."""
    spec = str(saved("tiny-llama")) if source == "directory" else "tiny-llama"
    ref = load_model(spec, dtype="bfloat16")
    off = load_model(spec, dtype="bfloat16", offload="disk", device_memory=3_000_000, offload_folder=tmp_path / "o")
    assert any(offloaded(layer) for layer in off.model.layers)
    assert off.model.rotary_emb.inv_freq.dtype == torch.float32
    assert off.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    ids = torch.randint(3, 259, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(off(ids).logits, ref(ids).logits)


@pytest.mark.parametrize("method", ["wanda-sp", "flap"])  # sequential and one-shot statistics passes
def test_hidden_on_reaches_every_layer_pass(monkeypatch, method):
    from suite.pruning import layerwise
    from suite.pipeline import prune

    seen = []
    capture = layerwise.LayerPass._capture

    def spy(self, windows, batch_size):
        seen.append((layerwise._HIDDEN_ON.get(), self.hidden_device))
        return capture(self, windows, batch_size)

    monkeypatch.setattr(layerwise.LayerPass, "_capture", spy)
    for hidden in (None, "cpu"):
        prune(load_model("tiny-llama"), byte_tokenizer(), method, 0.3, calib=CALIB, hidden_on=hidden)
    assert seen == [(None, torch.device("cpu")), ("cpu", torch.device("cpu"))]
    assert layerwise._HIDDEN_ON.get() is None  # reset after the pass


@pytest.mark.parametrize("method", ["wanda-sp", "flap"])
def test_in_memory_offload_storage(method):
    """accelerate's `cpu_offload` (every weight in a dict held by the hooks, what `--offload cpu`
    gives a CUDA device): changes are written into that dict; results equal the resident model's."""
    from accelerate import cpu_offload

    from suite.pipeline import prune

    tok = byte_tokenizer()
    ref, off = load_model("tiny-opt"), cpu_offload(load_model("tiny-opt"), execution_device="cpu")
    assert all(offloaded(layer) for layer in off.model.decoder.layers)
    a = prune(ref, tok, method, 0.3, calib=CALIB)
    b = prune(off, tok, method, 0.3, calib=CALIB)
    assert b.selection.plan.to_json() == a.selection.plan.to_json() and b.params_pruned == a.params_pruned
    store = off.model.decoder.layers[1].fc2._hf_hook.weights_map
    assert store["weight"].shape == ref.model.decoder.layers[1].fc2.weight.shape  # the sliced weight, stored
    ids = torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(off(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt", "tiny-bloom"])
def test_layer_gradients_equal_whole_model_backprop(saved, tmp_path, name):
    """`layerwise.layer_gradients` (one layer resident, offloaded or not) gives every decoder layer
    parameter's dL/dW and the loss of one whole-model `model(x, labels=x).loss.backward()`."""
    from suite.pruning.layerwise import layer_gradients

    ids = torch.randint(3, 259, (3, 20), generator=torch.Generator().manual_seed(4))
    ref = load_model(str(saved(name)))
    for p in ref.parameters():
        p.requires_grad_(True)
    loss = ref(ids, labels=ids, use_cache=False).loss
    loss.backward()
    layers = adapter_for(ref).layers(ref)
    expected = {(i, n): p.grad.clone() for i, layer in enumerate(layers) for n, p in layer.named_parameters()}
    off = _offloaded(saved(name), name, tmp_path)
    for model in (load_model(str(saved(name))), off):
        got = {}

        def keep(i, layer):
            got.update({(i, n): p.grad.clone() for n, p in layer.named_parameters()})

        total = layer_gradients(model, ids, keep, batch_size=2)
        assert total == pytest.approx(loss.item(), rel=1e-6)
        assert got.keys() == expected.keys()
        for key, grad in expected.items():
            torch.testing.assert_close(got[key], grad, rtol=1e-4, atol=1e-7)
        assert all(p.grad is None for p in model.parameters())


# -------------------------------------------- offload settings and the hidden-state placement (--hidden-on)
def suite_env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path]), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", **extra}


@pytest.mark.parametrize("method", ["random", "magnitude"])
def test_hidden_on_is_refused_for_a_data_free_method(tmp_path, capsys, monkeypatch, method):
    from suite import models
    from suite.cli import main

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    for where in ("cpu", "device"):
        args = ["prune", "--model", "tiny-llama", "--method", method, "--ratio", "0.2", "--out",
                str(tmp_path / "o"), "--hidden-on", where]
        assert main(args) == 2
        assert f"--hidden-on: {method} calibrates on nothing" in one_line_error(capsys)
    assert not (tmp_path / "o").exists()


def test_pruning_json_records_the_offload_settings(tmp_path):
    from suite.cli import main

    common = ["--model", "tiny-llama", "--method", "wanda-sp", "--ratio", "0.2", *CALIB_ARGS, "--quiet"]
    folder = tmp_path / "off"
    assert main(["prune", *common, "--out", str(tmp_path / "a"), "--offload", "disk", "--device-memory", "2MB",
                 "--offload-folder", str(folder), "--hidden-on", "cpu"]) == 0
    assert main(["prune", *common, "--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / d / "pruning.json").read_text()) for d in "ab")
    assert {k: a[k] for k in ("offload", "device_memory", "offload_folder", "hidden_on")} == {
        "offload": "disk", "device_memory": "2MB", "offload_folder": str(folder), "hidden_on": "cpu"}
    assert {k: b[k] for k in ("offload", "device_memory", "offload_folder", "hidden_on")} == {
        "offload": None, "device_memory": None, "offload_folder": None, "hidden_on": "device"}
    assert a["plan_summary"] == b["plan_summary"]  # the settings change no result


def test_sigterm_removes_the_temporary_offload_folder(tmp_path):
    """A process holding a tiny model loaded with offload="disk" (what `--offload disk` does) and the
    default, temporary offload folder is sent SIGTERM: the folder is gone, the process ended by SIGTERM."""
    import signal

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    code = ("from suite.models import load_model; "
            "m = load_model('tiny-llama', offload='disk', device_memory=2_000_000); "
            "print('loaded', flush=True); import time; time.sleep(300)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=suite_env(TMPDIR=str(tmp)), cwd=tmp_path)
    try:
        assert proc.stdout.readline().strip() == "loaded", proc.stderr.read()
        folders = list(tmp.glob("minillm-offload-*"))
        assert len(folders) == 1 and any(folders[0].iterdir())  # weights were offloaded there
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == -signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()
    assert not folders[0].exists()


@pytest.mark.parametrize("engine, own", [("cpu", "device"), ("device", "cpu")])
def test_contradicting_hidden_state_settings_are_refused_before_loading(tmp_path, capsys, monkeypatch, engine, own):
    from suite import models
    from suite.cli import main

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    assert main(["prune", "--model", "tiny-llama", "--method", "minillm", "--ratio", "0.2", "--out",
                 str(tmp_path / "o"), "--hidden-on", engine, "--opt", f"hidden_on={own}"]) == 2
    assert f"--opt hidden_on={own} contradicts --hidden-on {engine}" in one_line_error(capsys)
    assert not (tmp_path / "o").exists()
    with pytest.raises(UserError, match=r"methods\[0\]\.options\.hidden_on: 'device' contradicts the grid's"):
        load_grid(tmp_path, "minillm", "hidden_on: device", extra="hidden_on: cpu\n")


@pytest.mark.parametrize("args", [["--hidden-on", "cpu"], ["--opt", "hidden_on=cpu"]])
def test_pruning_json_says_cpu_in_all_three_places_whichever_spelling(tmp_path, args):
    """`--hidden-on cpu` and `--opt hidden_on=cpu`: the same setting, said the same everywhere (the
    record's hidden_on, its options.hidden_on, its method_info.hidden_on)."""
    from suite.cli import main

    out = tmp_path / "o"
    assert main(["prune", "--model", "tiny-llama", "--method", "minillm", "--ratio", "0.2", "--out", str(out),
                 "--quiet", "--nsamples", "2", "--seqlen", "16", "--opt", "directions=1", *args]) == 0
    record = json.loads((out / "pruning.json").read_text())
    assert (record["hidden_on"], record["options"]["hidden_on"], record["method_info"]["hidden_on"]) == ("cpu",) * 3


def test_one_hidden_state_knob_the_info_says_where_and_the_scores_are_the_same(monkeypatch):
    """`--hidden-on cpu` (layerwise.hidden_on) and `--opt hidden_on=cpu` are one mechanism: every
    layer-by-layer pass of minillm (statistics, SPSA) sees the same placement, the record's method
    info says where the hidden states were, and the scores do not depend on it."""
    from suite.pruning import layerwise
    from minillm.method import OPTIONS, score

    seen = []
    capture = layerwise.LayerPass._capture

    def spy(self, windows, batch_size):
        seen.append(layerwise.hidden_device())
        return capture(self, windows, batch_size)

    monkeypatch.setattr(layerwise.LayerPass, "_capture", spy)
    model = load_model("tiny-llama")
    sets = all_group_sets(model)
    windows = torch.randint(3, 259, (2, 16), generator=torch.Generator().manual_seed(0))
    o = {**OPTIONS, "directions": 2, "batch_size": 2}
    on_device = score(model, windows, sets, o, seed=0)
    assert on_device.info["hidden_on"] == "device" and seen == [None, None]  # statistics, then SPSA
    runs = {}
    with layerwise.hidden_on("cpu"):  # what --hidden-on cpu / a grid's hidden_on: cpu set
        runs["engine"] = score(model, windows, sets, o, seed=0)
    runs["option"] = score(model, windows, sets, {**o, "hidden_on": "cpu"}, seed=0)
    assert seen[2:] == ["cpu"] * 4 and layerwise.hidden_device() is None  # reset after score
    for run in runs.values():
        assert run.info["hidden_on"] == "cpu"
        assert run.scores.keys() == on_device.scores.keys()
        assert all(torch.equal(run.scores[k], on_device.scores[k]) for k in on_device.scores)


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-gemma2"])
def test_disk_offloaded_save_of_a_tied_model_writes_the_head_once(tmp_path, name):
    """A tied model whose embedding and head are offloaded to disk (accelerate gives each its own
    meta parameter, so transformers' tie test by tensor identity misses them; the head was written
    a second time): the pruned directory has the same files, of the same sizes, and the same
    tensors as the resident model's, and the head is not among them."""
    from safetensors.torch import load_file

    from suite.pipeline import prune
    from suite.pruning.plan import carried_plan
    from suite.pruning.saving import save_pruned

    tok, dirs, tensors = byte_tokenizer(), {}, {}
    for kind, kwargs in (("resident", {}), ("disk", {"offload": "disk", "device_memory": 100_000,
                                                     "offload_folder": tmp_path / "off"})):
        model = load_model(name, **kwargs)
        assert model.config.tie_word_embeddings
        if kwargs:
            assert {model.hf_device_map.get("lm_head"), model.hf_device_map.get("model")} == {"disk"}
        prune(model, tok, "magnitude", 0.3)
        dirs[kind] = save_pruned(model, tok, carried_plan(model), tmp_path / kind)
        tensors[kind] = load_file(dirs[kind] / "model.safetensors")
    sizes = {kind: {p.name: p.stat().st_size for p in d.iterdir()} for kind, d in dirs.items()}
    assert sizes["disk"] == sizes["resident"]
    assert "lm_head.weight" not in tensors["disk"]
    assert tensors["disk"].keys() == tensors["resident"].keys()
    assert all(torch.equal(tensors["disk"][k], tensors["resident"][k]) for k in tensors["resident"])
