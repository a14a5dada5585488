"""baselines/slicegpt.py through the pipeline: the budget (a fraction of all parameters, met by the
nearest width), the record, the transforming-method contract (no selection), and the refusals."""
import subprocess
import sys

import pytest
import torch

from suite.models import load_model, load_tokenizer
from suite.pipeline import outcome_record, prune
from suite.pruning.errors import UserError
from suite.pruning.layerwise import parameter_count
from suite.pruning.plan import carried_plan
from suite.pruning.saving import save_pruned
from suite.pruning.rotation import sliced_parameters

pytestmark = pytest.mark.usefixtures("one_thread")

CALIB = {"corpus": "c4", "nsamples": 4, "seqlen": 32}


@pytest.mark.parametrize("name,ratio,round_to", [("tiny-llama-gqa", 0.3, 8), ("tiny-opt", 0.2, None)])
def test_slicegpt_keeps_the_parameters_of_the_width_nearest_the_ratio(name, ratio, round_to):
    model = load_model(name).eval()
    reference = load_model(name).eval()  # shapes of the dense model for the independent count
    dense = parameter_count(model)
    outcome = prune(model, load_tokenizer(name), "slicegpt", ratio, calib=CALIB, round_to=round_to)
    record = outcome_record(outcome, ratio)
    info = record["method_info"]
    width, step = info["width"], round_to or 1
    assert width % step == 0 and model.get_input_embeddings().weight.shape[1] == width
    kept = parameter_count(model)
    assert record["params"] == {"dense": dense, "pruned": kept}
    assert info["slicing"] == pytest.approx(1 - width / model.config.hidden_size, abs=1e-6)
    assert info["ratio_at_width"] == pytest.approx(1 - kept / dense, abs=1e-6)
    target = (1 - ratio) * dense
    for other in (width - step, width + step):  # the neighbouring widths are no closer to the target
        if 0 < other <= model.config.hidden_size:
            assert abs(sliced_parameters(reference, other) - target) >= abs(kept - target)
    assert record["plan_summary"] == [{"heads": 8, "channels": reference.config.ffn_dim if name == "tiny-opt"
                                       else reference.config.intermediate_size}] * model.config.num_hidden_layers


def test_slicegpt_selects_no_groups_so_scope_and_layer_range_are_refused():
    model = load_model("tiny-llama").eval()
    for kwargs in ({"scope": "global"}, {"layers": "0:2"}):
        with pytest.raises(UserError, match="does not apply"):
            prune(model, load_tokenizer("tiny-llama"), "slicegpt", 0.3, calib=CALIB, **kwargs)


def test_slicegpt_refuses_a_ratio_no_width_reaches():
    model = load_model("tiny-llama").eval()
    with pytest.raises(UserError, match="cannot reach ratio 0.95"):
        prune(model, load_tokenizer("tiny-llama"), "slicegpt", 0.95, calib=CALIB)


@pytest.mark.slow
def test_a_sliced_checkpoint_reprunes_with_another_method_refused_in_one_line(tmp_path):
    model, tokenizer = load_model("tiny-llama-gqa").eval(), load_tokenizer("tiny-llama-gqa")
    prune(model, tokenizer, "slicegpt", 0.3, calib=CALIB)
    save_pruned(model, tokenizer, carried_plan(model), tmp_path / "sliced")
    reloaded = load_model(str(tmp_path / "sliced")).eval()
    ids = torch.randint(3, 259, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(reloaded(ids).logits).all()
    for method in ("wanda-sp", "slicegpt"):
        again = subprocess.run([sys.executable, "-m", "suite", "prune", "--model", str(tmp_path / "sliced"),
                                "--method", method, "--ratio", "0.2", "--nsamples", "4", "--seqlen", "32", "--quiet",
                                "--out", str(tmp_path / f"again-{method}")], capture_output=True, text=True)
        assert again.returncode == 2, again.stderr[-2000:]
        lines = again.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "already rotated and sliced" in lines[0]
        assert not (tmp_path / f"again-{method}").exists()
