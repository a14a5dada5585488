"""Fidelity of `shortgpt` and `sleb` against the authors' code, run as-is from their checkouts.

    python scripts/depth_fidelity.py SHORTGPT_DIR SLEB_DIR

SHORTGPT_DIR holds icip-cas/ShortGPT's `shortgpt/metrics.py` and `shortgpt/shortgpt.py`, SLEB_DIR
jiwonsong-dev/SLEB's `sleb.py` (nothing of theirs is copied here). Prints, per tiny model, the largest
relative difference between the suite's Block Influence and `ShortGPT.compute_bi` over transformers'
`hidden_states` (final norm randomised so the last layer's convention shows), both orders, and
SLEB's `get_loss` for the layer the suite removes first against the suite's loss per token.
"""
import sys
import types

import numpy as np
import torch

SHORTGPT_DIR, SLEB_DIR = sys.argv[1], sys.argv[2]
sys.path.insert(0, f"{SHORTGPT_DIR}/shortgpt")
sys.path.insert(0, SLEB_DIR)
import metrics  # noqa: E402,F401  (ShortGPT's; its shortgpt.py does `from metrics import *`)
# shortgpt_ref imports transformers only; its class is used without __init__ (that loads a hub model on cuda)
import shortgpt as shortgpt_ref  # noqa: E402
from suite.models import load_model
from suite.pruning.select import depth_budget
from baselines import shortgpt as suite_shortgpt  # noqa: E402
from tests.tiny import token_ids
for name in ["tiny-llama", "tiny-opt", "tiny-bloom", "tiny-gemma2", "tiny-qwen2"]:
    model = load_model(name).eval()
    norm = __import__("suite.pruning.architectures", fromlist=["adapter_for"]).adapter_for(model).tail(model)[0]
    with torch.no_grad():
        norm.weight.copy_(torch.rand(norm.weight.shape, generator=torch.Generator().manual_seed(5)) + 0.5)
    windows = token_ids(4, 64, seed=11)
    ref = shortgpt_ref.ShortGPT.__new__(shortgpt_ref.ShortGPT)
    ref.importances = [0 for _ in range(model.config.num_hidden_layers)]
    with torch.no_grad():
        for w in windows:
            hs = model(w[None], output_hidden_states=True).hidden_states
            ref.compute_bi([h.double() for h in hs])  # the authors' arithmetic, in float64 here (theirs: fp16 on cuda)
    ours = suite_shortgpt.score_layers(model, windows, depth_budget(model, 0.3), suite_shortgpt.OPTIONS, 0).info["block_influence"]
    rel = max(abs(a - b) / abs(b) for a, b in zip(ours, ref.importances))
    print(name, "max rel diff", f"{rel:.2e}", "order ours", sorted(range(len(ours)), key=lambda i: ours[i]),
          "authors", np.argsort(np.array(ref.importances)).tolist())
# SLEB get_loss as-is (its imports: fire, tqdm, utils.*: stubbed; get_loss itself uses torch only)
for mod in ["fire", "utils", "utils.model_utils", "utils.onoff_utils", "utils.onoff_utils.onoff", "utils.data_utils",
            "utils.block_remove", "utils.eval_utils"]:
    sys.modules[mod] = types.ModuleType(mod)
sys.modules["utils.model_utils"].get_llm = None
sys.modules["utils.onoff_utils.onoff"].block_replace = sys.modules["utils.onoff_utils.onoff"].turn_off = sys.modules["utils.onoff_utils.onoff"].turn_on = None
sys.modules["utils.block_remove"].block_remove = None
sys.modules["utils.eval_utils"].load_and_eval_ppl = sys.modules["utils.eval_utils"].eval_zero_shot = None
import sleb as sleb_ref  # noqa: E402
from baselines import sleb  # noqa: E402
model = load_model("tiny-llama").eval()
model.seqlen = 32
windows = token_ids(3, 32, seed=12)
class Enc: input_ids = windows.reshape(1, -1)
theirs = sleb_ref.get_loss(model, Enc, bs=1, device="cpu")
b = depth_budget(model, 0.2); b.count = 1
ours = sleb.score_layers(model, windows, b, sleb.OPTIONS, 0)
# ours: per-token loss of the best removal; evaluate theirs for the same removal with turn_off done by hand
best = ours.info["removal_order"][0]
layer = model.model.layers[best]
layer.forward = lambda hidden_states, *a, **k: hidden_states
theirs_best = sleb_ref.get_loss(model, Enc, bs=1, device="cpu")
print("sleb removal", best, "ours per token", ours.info["loss_per_token"][0], "authors get_loss / (n*seqlen)", theirs_best / windows.numel())
