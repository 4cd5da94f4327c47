"""Head rows from a checkpoint: the plan by label name or mapping, and the copy into every deep-supervision head."""
from __future__ import annotations

import pytest
import torch

from nnunet_transfer.checkpoints import is_seg_key
from nnunet_transfer.errors import ConfigError, DataError
from nnunet_transfer.training.heads import copy_head_rows, plan_heads, seg_head_state
from nets import unet

SOURCE = {"labels": {"background": 0, "liver": 1, "tumor": 2}}
TARGET = {"labels": {"background": 0, "tumor": 1, "cyst": 2}}


def test_by_name_copies_the_shared_labels_and_starts_the_rest_new():
    plan = plan_heads("by-name", SOURCE, TARGET, checkpoint="a.pth")
    assert [(c["target"], c["target_value"], c["source_value"]) for c in plan.copied] == [
        ("background", 0, 0), ("tumor", 1, 2)]
    assert plan.new == ["cyst"]


def test_mapping_by_name_or_value_and_the_errors_that_name_the_labels():
    plan = plan_heads({"cyst": "liver", "1": "2"}, SOURCE, TARGET, checkpoint="a.pth")
    assert [(c["target"], c["source"]) for c in plan.copied] == [("tumor", "tumor"), ("cyst", "liver")]
    assert plan.new == ["background"]
    with pytest.raises(ConfigError, match=r"source label 'lung' does not exist in the checkpoint's dataset.json"):
        plan_heads({"cyst": "lung"}, SOURCE, TARGET, checkpoint="a.pth")
    with pytest.raises(ConfigError, match="mapped twice"):
        plan_heads({"cyst": "liver", "2": "tumor"}, SOURCE, TARGET, checkpoint="a.pth")
    assert plan_heads("new", SOURCE, TARGET, checkpoint="a.pth") is None


def test_copy_writes_the_planned_rows_of_every_head_and_leaves_the_others():
    source, target = unet(n=3, seed=0, num_classes=3), unet(n=3, seed=1, num_classes=3)
    before = {n: p.detach().clone() for n, p in target.named_parameters() if is_seg_key(n)}
    heads = seg_head_state(source.state_dict())
    assert heads and all(is_seg_key(k) for k in heads)
    plan = plan_heads("by-name", SOURCE, TARGET, checkpoint="a.pth")
    written = copy_head_rows(target, heads, plan)
    assert sorted(written) == sorted(before) and len(written) == 4  # weight + bias of both heads (n = 3)
    now = dict(target.named_parameters())
    for name in written:
        assert torch.equal(now[name][0], heads[name][0]) and torch.equal(now[name][1], heads[name][2])
        assert torch.equal(now[name][2], before[name][2])  # cyst: nnU-Net's initialisation


def test_copy_refuses_heads_whose_shape_differs_beyond_the_label_axis():
    source, target = unet(n=3, seed=0, num_classes=3, features=[8, 16, 32]), unet(n=3, seed=1, num_classes=3)
    with pytest.raises(DataError, match=r"only the number of labels \(the first axis\) may differ"):
        copy_head_rows(target, seg_head_state(source.state_dict()), plan_heads("by-name", SOURCE, TARGET,
                                                                               checkpoint="a.pth"))
