"""`wanda-sp` is sequential by default; `sequential=false` is the one-shot variant, named as such in
grid labels, records (`variant`) and tables, and it keeps other layers' choices than the default."""

import pytest

from suite.config import expand_cells, load_config
from suite.pipeline import outcome_record, prune
from suite.tables import results_frame

GRID = """name: t
models: [tiny-llama]
methods: [wanda-sp, {name: wanda-sp, options: {sequential: false}}, {name: wanda-sp, label: mine, options: {sequential: false, batch_size: 2}}, flap]
ratios: [0.3]
"""


def test_grid_labels_name_the_one_shot_variant(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(GRID)
    config = load_config(path)
    assert [m["label"] for m in config["methods"]] == ["wanda-sp", "wanda-sp (one-shot)", "mine", "flap"]
    cells = [c for c in expand_cells(config) if c["method"] != "dense"]
    assert [c["label"] for c in cells] == ["wanda-sp", "wanda-sp (one-shot)", "mine", "flap"]


def test_records_and_table_name_the_variant():
    from suite.models import load_model, load_tokenizer

    tok = load_tokenizer("tiny-llama")
    records, plans = [], {}
    for label, options in (("wanda-sp", {}), ("wanda-sp (one-shot)", {"sequential": False})):
        outcome = prune(load_model("tiny-llama"), tok, "wanda-sp", 0.3, options=options,
                        calib={"nsamples": 4, "seqlen": 32})
        record = outcome_record(outcome, 0.3)
        assert record["variant"] == ("one-shot" if options else "sequential")
        assert record["method_info"]["sequential"] is not bool(options)
        plans[label] = [(lp.heads, lp.channels) for lp in outcome.selection.plan.layers]
        records.append({"model": "tiny-llama", "method": "wanda-sp", "label": label, "status": "ok",
                        "perplexity": {"wikitext2": 10.0}, **record})
    assert plans["wanda-sp"][0] == plans["wanda-sp (one-shot)"][0]   # layer 0: same dense inputs
    assert plans["wanda-sp"] != plans["wanda-sp (one-shot)"]         # later layers see the pruned ones
    assert list(results_frame(records)["Method"]) == ["wanda-sp", "wanda-sp (one-shot)"]


def test_sequential_refuses_global_scope():
    from suite.pruning.errors import UserError
    from suite.models import load_model, load_tokenizer

    with pytest.raises(UserError, match="needs --opt sequential=false"):
        prune(load_model("tiny-llama"), load_tokenizer("tiny-llama"), "wanda-sp", 0.3, scope="global",
              calib={"nsamples": 2, "seqlen": 16})
