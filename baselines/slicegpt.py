"""`slicegpt`: delete directions of the residual stream after a PCA rotation (SliceGPT).

Ashkboos, Croci, Nascimento, Hoefler, Hensman 2024, *SliceGPT: Compress Large Language Models by
Deleting Rows and Columns*, ICLR 2024, arXiv 2401.15024; code microsoft/TransformerCompression
`src/slicegpt/` (`layernorm_fusion.py`, `rotate.py` `rotate_and_slice` / `pca_calc`,
`adapters/*`). SliceGPT scores no heads or channels: it makes the residual stream's width d′
smaller than the hidden size D. The engine does the work (`suite/pruning/rotation.py`: norm fusion,
the layer-by-layer PCA, rotation, slicing and the shortcut matrices); this module chooses d′ and
reports. It is the suite's first *transforming* method (`suite/pruning/scoring.py` `transform`).

Budget. The suite's ratio is a fraction of ALL parameters; the paper quotes the slicing fraction
1 − d′/D instead. d′ is the multiple of `round_to` (default 1; the authors round to 8,
`--round-interval`) whose sliced model — shortcut matrices (two per layer, ~2·d′² parameters) and
the head untied from the embedding included — keeps the parameter count nearest to
(1 − ratio) × dense (`rotation.width_for_ratio`). The record's `method_info` carries the width d′,
the hidden size, the slicing fraction and the ratio the width achieves. On a model with tied
embeddings (SmolLM2) the untied head costs vocab × D parameters, so the slicing fraction is much
larger than the ratio (SmolLM2-135M: about 45 % slicing for ratio 0.2).

Calibration. The authors' paper calibrates on 1024 WikiText-2 *train* windows of 2048 tokens
(`experiments/run_slicegpt.py --cal-dataset wikitext2 --cal-max-seqlen 2048`; the script's default
is 128 samples, batch 16). This suite's offline mirror has no WikiText-2 train split (only its test
split, which perplexity evaluates on: /work/shared/data/README.md), so the default here is the
suite's own: 128 C4 windows of 128 tokens, the calibration of wanda-sp and flap. `--calib`,
`--nsamples`, `--seqlen` override it; the record's `calibration_origin` says which applied.

Options: `slice_head` (default false, the authors' `do_slice_head`): slice the last layer's
output and the head to d′ too. `batch_size` (default 1): windows per micro-batch of the layer pass
(the authors' `--cal-batch-size 16`; the PCA does not depend on it, only the peak memory does).
`centre_embeddings` (default false): subtract each embedding row's mean in RMSNorm families too, as
the authors' `fuse_modules` does for every family; it changes an RMSNorm model's function (RMSNorm
is not invariant to the mean), which is why it is off here; on for reproducing their numbers
(results/notes/slicegpt.md §3). LayerNorm families (OPT) are centred either way (exact there).

Deliberate differences (see also rotation.py): the kept directions are left in PCA orientation
(the script's default `--final-orientation random` rotates them by a random orthogonal matrix inside
the kept block: the same subspace and function, another basis); the norms keep the model's epsilon.
Families: LLaMA (MHA/GQA), Mistral, Qwen2/2.5, Qwen3, Phi-3 and OPT; Gemma 2/3 and BLOOM are refused
in one line with the reason (their adapters' `residual_refusal`).
"""
from __future__ import annotations

from typing import Annotated

from pydantic import Field

from suite.pruning.layerwise import parameter_count
from suite.pruning.options import Bool, Int, MethodOptions
from suite.pruning.rotation import rotate_and_slice, width_for_ratio
from suite.pruning.scoring import Transform

NAME = "slicegpt"


class Options(MethodOptions):
    slice_head: Bool = False
    batch_size: Annotated[Int, Field(ge=1)] = 1
    centre_embeddings: Bool = False


OPTIONS = Options.defaults()
CALIBRATION = {
    "corpus": "c4", "nsamples": 128, "seqlen": 128,
    "source": "authors: WikiText-2 train, 1024 x 2048 (paper Sec. 4; run_slicegpt.py --cal-dataset wikitext2 "
              "--cal-max-seqlen 2048); the offline mirror has no WikiText-2 train split, so the suite's C4 128 x 128",
}
SELECTION = {"scope": "layer", "layers": "all"}  # not used: a transforming method selects no groups


def transform(model, windows, ratio, options, seed, round_to=None) -> Transform:
    """Fuse, rotate and slice `model` in place to the width d′ the budget chooses (module docstring).

    windows: [nsamples, seqlen] calibration token ids. Raises UserError for a family without the
    invariance, a ratio no width reaches, or a model already sliced or pruned."""
    dense = parameter_count(model)
    full = model.config.hidden_size
    width, predicted = width_for_ratio(model, ratio, round_to, options["slice_head"])
    rotate_and_slice(model, windows, width, slice_head=options["slice_head"], batch_size=options["batch_size"],
                     centre_embeddings=options["centre_embeddings"])
    kept = parameter_count(model)
    if kept != predicted:
        raise AssertionError(f"slicegpt budget: the sliced model has {kept:,} parameters, predicted {predicted:,}")
    info = {"width": width, "hidden_size": full, "slicing": round(1 - width / full, 6),
            "ratio_at_width": round(1 - kept / dense, 6), "round_to": round_to,
            "slice_head": options["slice_head"], "centre_embeddings": options["centre_embeddings"],
            "tokens": int(windows.numel())}
    return Transform(target_removed=round(float(ratio) * dense), removed=dense - kept, info=info)
