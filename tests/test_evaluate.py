"""suite/evaluate.py against hand-written computations on tiny-llama (perplexity, lm-eval zero-shot)."""
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from suite.pruning.errors import UserError
from suite import data, evaluate
from suite.models import load_model, load_tokenizer

MIRROR = Path(os.environ.get("MINILLM_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


@pytest.fixture(autouse=True)
def mirror(monkeypatch):
    monkeypatch.setenv("MINILLM_DATA", str(MIRROR))
    return MIRROR


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama"), load_tokenizer("tiny-llama")


# --------------------------------------------------------------------------- perplexity
def test_perplexity_matches_a_cross_entropy_loop(tiny):
    model, tok = tiny
    seq, n = 64, 6
    # the byte-level tiny tokenizer maps a (whitespace-cut) text prefix to a token prefix
    stream = tok(data.corpus_text("ptb")[: 2 * n * seq], add_special_tokens=False)["input_ids"][: n * seq]
    nlls = []
    with torch.no_grad():
        for k in range(n):  # one window at a time, LLM-Pruner style: loss over positions 1..L-1
            window = torch.tensor([stream[k * seq: (k + 1) * seq]])
            logits = model(window).logits[0]
            nlls.append(F.cross_entropy(logits[:-1], window[0, 1:]).item())
    expected = math.exp(sum(nlls) / n)
    # batch 4 over 6 windows: a full and a partial batch
    got = evaluate.perplexity(model, tok, "ptb", seq_len=seq, max_tokens=n * seq, batch_size=4, quiet=True)
    assert got == pytest.approx(expected, rel=1e-5)
    assert 1 < got < 512 * 4  # a random model is near-uniform over the 512-token vocabulary


# --------------------------------------------------------------------------- zero-shot
LIMIT = 5
OFFLINE_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
TOY_YAML = """task: minillm_toy
dataset_path: minillm/toy_mc
dataset_name: null
output_type: multiple_choice
test_split: test
doc_to_text: "Q: {{q}}\\nA:"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - metric: acc
"""
NO_EVAL_SPLIT_YAML = TOY_YAML.replace("minillm_toy", "minillm_toy_nosplit").replace(
    "minillm/toy_mc", "minillm/toy_nosplit").replace("test_split: test", "training_split: train\ntest_split: test")


def loglik(model, tok, context, continuation):
    """Summed log-probability of `continuation` after `context` (lm-eval's loglikelihood, by hand)."""
    ctx = tok(context)["input_ids"]
    whole = tok(context + continuation)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    return sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))


def scored(model, tok, docs, context, choices):
    """Per doc: the choice log-likelihoods (continuations are " " + choice, lm-eval's delimiter)."""
    return [[loglik(model, tok, context(d), " " + c) for c in choices(d)] for d in docs]


def argmax(xs):
    return max(range(len(xs)), key=xs.__getitem__)


def golds_for(lls):
    """Gold labels that make the model right on the first 3 of 5 docs and wrong on the last 2: acc 0.6."""
    return [argmax(l) if i < 3 else (argmax(l) + 1) % len(l) for i, l in enumerate(lls)]


def acc_norm(lls, docs, choices, golds):
    return sum(argmax([x / len(c) for x, c in zip(l, choices(d))]) == g
               for l, d, g in zip(lls, docs, golds)) / len(golds)


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path, n):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(next(fh)) for _ in range(n)]


@pytest.fixture(scope="module")
def zero_shot_run(tiny, tmp_path_factory):
    """A private mirror (piqa, arc_challenge, a toy task from a custom YAML dir) with gold labels
    chosen so that the expected accuracy is known, then ONE zero_shot call over all of them."""
    model, tok = tiny
    root = tmp_path_factory.mktemp("mirror")
    expected = {}

    # piqa: real YAML, validation split only; 7 rows so that --limit 5 matters
    piqa = read_jsonl(MIRROR / "hf/baber/piqa/default/validation.jsonl", 7)
    ctx = lambda d: f"Question: {d['goal']}\nAnswer:"
    ch = lambda d: [d["sol1"], d["sol2"]]
    lls = scored(model, tok, piqa[:LIMIT], ctx, ch)
    golds = golds_for(lls)
    for d, g in zip(piqa, golds + [0, 1]):
        d["label"] = g
    write_jsonl(root / "hf/baber/piqa/default/validation.jsonl", piqa)
    expected["piqa"] = {"acc": 0.6, "acc_norm": acc_norm(lls, piqa, ch, golds)}

    # arc_challenge: its YAML `include`s arc_easy.yaml; ARC-Easy rows stand in for its test split
    arc = read_jsonl(MIRROR / "hf/allenai/ai2_arc/ARC-Easy/test.jsonl", 6)
    ctx = lambda d: f"Question: {d['question']}\nAnswer:"
    ch = lambda d: d["choices"]["text"]
    lls = scored(model, tok, arc[:LIMIT], ctx, ch)
    golds = golds_for(lls)
    for d, g in zip(arc, golds + [0]):
        d["answerKey"] = d["choices"]["label"][g]
    write_jsonl(root / "hf/allenai/ai2_arc/ARC-Challenge/test.jsonl", arc)
    expected["arc_challenge"] = {"acc": 0.6, "acc_norm": acc_norm(lls, arc, ch, golds)}

    # a task that exists only in this test's YAML directory and mirror
    toy = [{"q": f"what is {i} plus {i}?", "choices": [str(2 * i), str(i), "cat"], "label": 0} for i in range(LIMIT)]
    ctx = lambda d: f"Q: {d['q']}\nA:"
    ch = lambda d: d["choices"]
    golds = golds_for(scored(model, tok, toy, ctx, ch))
    for d, g in zip(toy, golds):
        d["label"] = g
    write_jsonl(root / "hf/minillm/toy_mc/default/test.jsonl", toy)
    write_jsonl(root / "hf/minillm/toy_nosplit/default/train.jsonl", toy)  # no evaluation split
    expected["minillm_toy"] = {"acc": 0.6}
    tasks_dir = tmp_path_factory.mktemp("tasks")
    (tasks_dir / "toy.yaml").write_text(TOY_YAML)
    (tasks_dir / "toy_nosplit.yaml").write_text(NO_EVAL_SPLIT_YAML)

    tasks = ["piqa", "arc_challenge", "minillm_toy", "hellaswag", "minillm_toy_nosplit"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINILLM_DATA", str(root))
        for var in OFFLINE_VARS:
            mp.delenv(var, raising=False)
        result = evaluate.zero_shot(model, tok, tasks, limit=LIMIT, batch_size=4, quiet=True,
                                    include_path=str(tasks_dir))
        result["_env_after"] = {var: os.environ.get(var) for var in OFFLINE_VARS}
    return result, expected, root, tasks_dir


def test_zero_shot_accuracy_matches_hand_computed_loglikelihoods(zero_shot_run):
    result, expected, _, _ = zero_shot_run
    for task, want in expected.items():
        got = result[task]
        assert "skipped" not in got, got
        for metric, value in want.items():
            assert got[metric] == pytest.approx(value), (task, metric)
        assert set(got) <= set(evaluate.METRICS) and "acc_stderr" in got
    assert result["_mean"] == pytest.approx(0.6)


def test_tasks_without_offline_data_are_skipped_not_raised(zero_shot_run):
    result, _, root, _ = zero_shot_run
    assert [k for k in result if not k.startswith("_")] == [
        "piqa", "arc_challenge", "minillm_toy", "hellaswag", "minillm_toy_nosplit"]
    assert str(root / "hf/Rowan/hellaswag/default") in result["hellaswag"]["skipped"]
    assert "no evaluation split" in result["minillm_toy_nosplit"]["skipped"]
    # zero_shot forces the hub offline while it runs and restores the environment afterwards
    assert result["_env_after"] == {var: None for var in OFFLINE_VARS}


def test_mirror_config_is_the_tasks_yaml_redirected(zero_shot_run):
    _, _, root, tasks_dir = zero_shot_run
    cfg = evaluate.mirror_task_config(evaluate.task_manager(str(tasks_dir)), "arc_challenge", root)
    assert cfg["task"] == "arc_challenge" and "include" not in cfg
    assert cfg["doc_to_text"] == "Question: {{question}}\nAnswer:"  # from the included arc_easy.yaml
    assert (cfg["dataset_path"], cfg["dataset_name"]) == ("json", None)
    assert cfg["dataset_kwargs"] == {"data_files": {"test": str(root / "hf/allenai/ai2_arc/ARC-Challenge/test.jsonl")}}
    assert cfg["training_split"] is None and cfg["validation_split"] is None and cfg["test_split"] == "test"


def test_task_index_cache_indexes_only_the_requested_tasks(tmp_path, monkeypatch):
    monkeypatch.setenv("MINILLM_CACHE", str(tmp_path))
    tasks = ("piqa", "arc_easy", "arc_challenge", "boolq")
    full = evaluate._full_task_manager(None)
    small = evaluate.task_manager(None, tasks=tasks)  # first call writes the cache
    cached = json.loads(evaluate._task_dirs_file().read_text())
    assert evaluate._task_dirs_file().parent == tmp_path
    assert cached["dirs"]["arc_easy"] == str(Path(full.task_index["arc_easy"].yaml_path).parent)
    again = evaluate.task_manager(None, tasks=tasks)  # read back from the cache
    for tm in (small, again):
        assert len(tm.task_index) < 100 < len(full.task_index)
        for name in tasks:
            assert tm.task_index[name].yaml_path == full.task_index[name].yaml_path
            assert tm.task_index[name].cfg == full.task_index[name].cfg
    # a name the cache does not hold (a tag, an unknown name) falls back to the full index
    assert evaluate.task_manager(None, tasks=("ai2_arc",)) is full


def test_unknown_task_is_a_user_error(tiny, zero_shot_run):
    model, tok = tiny
    with pytest.raises(UserError, match="no_such_task"):
        evaluate.zero_shot(model, tok, ["no_such_task"], include_path=str(zero_shot_run[3]))
    with pytest.raises(UserError, match="ai2_arc"):  # a tag, not a task
        evaluate.zero_shot(model, tok, ["ai2_arc"], include_path=str(zero_shot_run[3]))


# --------------------------------------------------------------------------- CLI
def test_eval_command_prints_and_writes_json(tiny, tmp_path, capsys):
    from suite.cli import main

    out = tmp_path / "sub" / "eval.json"
    assert main(["eval", "--model", "tiny-llama", "--ppl", "ptb", "--seqlen", "64", "--max-tokens", "256",
                 "--json", str(out), "--quiet"]) == 0
    record = json.loads(out.read_text())
    model, tok = tiny
    assert record["perplexity"]["ptb"] == pytest.approx(
        evaluate.perplexity(model, tok, "ptb", seq_len=64, max_tokens=256, quiet=True), rel=1e-6)
    assert "ppl ptb" in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == ["eval.json"]  # no temp file left behind
    assert main(["eval", "--model", "tiny-llama", "--ppl", "pile"]) == 2  # UserError -> exit 2


# ------------------------------------------------------------------------ windows longer than the positions
def test_window_limit_is_the_opt_position_table():
    from suite.evaluate import check_window

    model = load_model("tiny-opt")
    table = model.model.decoder.embed_positions  # learned: rows past OPT's offset of 2
    rows = table.weight.shape[0] - table.offset
    ids = torch.randint(3, 259, (1, rows + 1))
    with torch.no_grad():
        model(ids[:, :rows])  # the limit itself runs
        with pytest.raises(IndexError):
            model(ids)  # one more position does not: what the check must catch first
    assert check_window(model, rows) is None
    with pytest.raises(UserError, match=f"exceeds the model's {rows} learned positions"):
        check_window(model, rows + 1)


def test_rotary_extrapolation_is_a_warning(capsys):
    from suite.evaluate import check_window

    model = load_model("tiny-llama")
    trained = model.config.max_position_embeddings
    assert check_window(model, trained) is None
    warning = check_window(model, 2 * trained)
    assert f"trained length {trained}" in warning and "rotary" in warning
    assert capsys.readouterr().err == f"warning: {warning}\n"
    assert check_window(load_model("tiny-bloom"), 10 ** 6) is None  # ALiBi, no length in its config


def test_cli_too_long_window_is_one_line_exit_2(tmp_path, capsys):
    from suite.cli import main

    assert main(["eval", "--model", "tiny-opt", "--seqlen", "1025", "--max-tokens", "2050", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "1024" in err[0]
    out = tmp_path / "p"
    argv = ["prune", "--model", "tiny-opt", "--method", "wanda-sp", "--ratio", "0.2", "--nsamples", "1",
            "--seqlen", "1025", "--out", str(out), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: calibration seqlen 1025") and "1024" in err[0]
    assert not out.exists() and not list(tmp_path.iterdir())


def test_eval_records_the_extrapolation_warning(tmp_path):
    import json

    from suite.cli import main

    out = tmp_path / "m.json"
    assert main(["eval", "--model", "tiny-llama", "--seqlen", "1100", "--max-tokens", "1100", "--quiet",
                 "--json", str(out)]) == 0
    assert "trained length 1024" in json.loads(out.read_text())["warnings"][0]


def test_grid_cell_checks_its_windows():
    from suite.pipeline import run_cell

    ev = {"seqlen": 1100, "perplexity": ["wikitext2"], "max_tokens": 1100, "throughput": False}
    record = run_cell({"model": "tiny-llama", "method": "dense", "evaluation": ev})
    assert "trained length 1024" in record["warnings"][0]
    with pytest.raises(UserError, match="1024 learned positions"):
        run_cell({"model": "tiny-opt", "method": "dense", "evaluation": {**ev, "seqlen": 1025}})
