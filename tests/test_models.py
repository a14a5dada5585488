"""suite/models.py: the embedded model's cached copy is made once, even by concurrent first uses."""
from __future__ import annotations

import threading
import time

from suite import models


def test_concurrent_first_uses_convert_the_embedded_model_once(tmp_path, monkeypatch):
    # as two grid cells of `suite run --jobs 2` on an empty cache (flock also excludes threads that
    # open the lock file separately, so threads stand in for the processes here)
    calls = []

    def slow_conversion(gguf_path, out_dir):
        calls.append(out_dir)
        time.sleep(0.3)  # both users are inside embedded_model_dir meanwhile
        out_dir.mkdir()
        (out_dir / "config.json").write_text("{}")  # a second conversion would fail here: the dir exists
        return out_dir

    monkeypatch.setenv("MINILLM_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_dequantise_gguf", slow_conversion)
    monkeypatch.setattr(models, "embedded_gguf_path", lambda: tmp_path / "model.gguf")
    got, errors = [], []

    def use():
        try:
            got.append(models.embedded_model_dir())
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    users = [threading.Thread(target=use) for _ in range(3)]
    for t in users:
        t.start()
    for t in users:
        t.join()
    assert errors == []
    assert len(calls) == 1
    assert got == [tmp_path / "smollm2-135m-instruct-f32"] * 3


# --------------------------------------------------------------------------- a .gguf file given by path
def _gguf_file(tmp_path, monkeypatch, name="tiny-llama-gqa"):
    """A seeded tiny LLaMA written as a .gguf file (tests/tiny.py `write_gguf`), with an empty cache."""
    from tests.tiny import write_gguf

    monkeypatch.setenv("MINILLM_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "user" / f"{name}.gguf"
    path.parent.mkdir()
    write_gguf(models._tiny_model(name), path)
    return path


def _logits(spec, ids):
    import torch

    with torch.no_grad():
        return models.load_model(str(spec))(ids).logits


def test_a_gguf_file_prunes_saves_evaluates_and_prunes_again(tmp_path, monkeypatch, capsys):
    """`suite prune --model FILE.gguf` (was: transformers' "quantized with gguf and is not serializable"
    at save, exit 1): converted once into the cache, keyed by the file's content; the saved prune
    reloads to the logits of the same prune of the model the file was written from (within 1e-6);
    the record names the file and its SHA-256 (computed here with hashlib); `suite eval` and a
    second prune run on the result; a renamed copy of the file is not converted again."""
    import hashlib
    import json

    import torch

    from suite.cli import main

    gguf = _gguf_file(tmp_path, monkeypatch)
    common = ["--method", "wanda-sp", "--ratio", "0.2", "--nsamples", "2", "--seqlen", "32", "--quiet"]
    assert main(["prune", "--model", str(gguf), "--out", str(tmp_path / "from-gguf"), *common]) == 0
    assert main(["prune", "--model", "tiny-llama-gqa", "--out", str(tmp_path / "from-tiny"), *common]) == 0
    ids = torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(tmp_path / "from-gguf", ids), _logits(tmp_path / "from-tiny", ids),
                               rtol=0, atol=1e-6)
    record = json.loads((tmp_path / "from-gguf" / "pruning.json").read_text())
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert record["model_source"]["gguf"] == str(gguf.resolve()) and record["model_source"]["sha256"] == digest
    converted = sorted(p for p in (tmp_path / "cache").glob("gguf-*") if p.is_dir())
    assert [p.name for p in converted] == [f"gguf-{digest[:16]}"]
    assert json.loads((converted[0] / "gguf_source.json").read_text())["sha256"] == digest
    assert "quantization_config" not in json.loads((tmp_path / "from-gguf" / "config.json").read_text())

    assert main(["eval", "--model", str(tmp_path / "from-gguf"), "--max-tokens", "256", "--seqlen", "64",
                 "--json", str(tmp_path / "eval.json"), "--quiet"]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["perplexity"]["wikitext2"] > 1
    assert main(["prune", "--model", str(tmp_path / "from-gguf"), "--method", "magnitude", "--ratio", "0.1",
                 "--out", str(tmp_path / "twice"), "--quiet"]) == 0
    assert len(json.loads((tmp_path / "twice" / "plan.json").read_text())["layers"][0]["heads"]) < 8

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(models, "_dequantise_gguf", no_second_conversion)
    copy = tmp_path / "renamed.gguf"
    copy.write_bytes(gguf.read_bytes())
    torch.testing.assert_close(_logits(copy, ids), _logits("tiny-llama-gqa", ids), rtol=0, atol=1e-6)


def test_a_directory_whose_config_names_gguf_quantization_loads_as_a_plain_model(tmp_path, monkeypatch):
    """What transformers' `save_pretrained` of a GGUF-loaded model's config leaves (quantization_config
    {"quant_method": "gguf"}) beside plain safetensors: loaded without the GGUF quantizer, so pruning
    saves (was: "not serializable"); same logits as the model the weights came from."""
    import json

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from suite.pipeline import prune
    from suite.pruning.plan import carried_plan
    from suite.pruning.saving import save_pruned

    gguf = _gguf_file(tmp_path, monkeypatch)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    folder = tmp_path / "gguf-config"
    loaded.config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in loaded.state_dict().items()}, folder / "model.safetensors")
    models.byte_tokenizer().save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["quant_method"] == "gguf"
    model = models.load_model(str(folder))
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")
    ids = torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(folder, ids), _logits("tiny-llama-gqa", ids), rtol=0, atol=1e-6)
    prune(model, models.byte_tokenizer(), "magnitude", 0.2)
    out = save_pruned(model, models.byte_tokenizer(), carried_plan(model), tmp_path / "pruned")
    with torch.no_grad():
        torch.testing.assert_close(_logits(out, ids), model(ids).logits, rtol=0, atol=1e-6)
