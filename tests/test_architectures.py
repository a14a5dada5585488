"""Groups (suite/pruning/architectures.py): a group's column block, and the out-projection-only view of
the group sets."""
import torch

from suite.models import load_model
from suite.pruning.architectures import all_group_sets, group_columns, output_only


def test_group_columns_lists_each_groups_block():
    assert group_columns([0, 2], 3).tolist() == [0, 1, 2, 6, 7, 8]
    assert group_columns([4, 1], 1).tolist() == [4, 1]
    assert group_columns([], 5).tolist() == [] and group_columns([], 5).dtype == torch.long


def test_output_only_keeps_the_out_projection_member():
    model = load_model("tiny-llama")
    sets = all_group_sets(model)
    only = output_only(sets)
    assert [(g.layer, g.kind, g.count) for g in only] == [(g.layer, g.kind, g.count) for g in sets]
    assert all(g.members == (s.output,) and g.output == s.output and g.module is s.module
               for g, s in zip(only, sets))
    assert {s.output.name for s in sets} == {"self_attn.o_proj", "mlp.down_proj"}
