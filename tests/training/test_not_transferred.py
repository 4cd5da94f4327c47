"""What did not come from the source, counted and said without a trainer (names chosen by hand)."""
from __future__ import annotations

import torch

from nnunet_transfer.training.not_transferred import (not_transferred_names, not_transferred_text, source_names,
                                                      spare_not_transferred)

SEG = "decoder.seg_layers.0.weight"
PARAMS = {"encoder.stages.0.conv.weight": torch.zeros(2, 1, 3), "encoder.stages.1.conv.weight": torch.zeros(4, 2, 3),
          "decoder.stages.0.conv.weight": torch.zeros(5), SEG: torch.zeros(3, 2)}


def record(*fresh: str) -> dict:
    return {"kind": "adapted", "blocks": [{"block": 2, "fresh": list(fresh)}]}


def test_source_names_follow_the_record_and_the_heads():
    assert source_names(PARAMS, None, None) is None  # no pretrained weights: the network counts as a whole
    new = "encoder.stages.1.conv.weight"
    assert source_names(PARAMS, record(new), None) == set(PARAMS) - {new, SEG}
    # head rows count as transferred only when every target label got one
    assert source_names(PARAMS, record(new), {"copied": [{"target": "a"}], "new": []}) == set(PARAMS) - {new}
    assert SEG not in source_names(PARAMS, record(new), {"copied": [{"target": "a"}], "new": ["b"]})


def test_not_transferred_names_leave_out_the_heads():
    assert not_transferred_names(PARAMS, None) == set()
    assert not_transferred_names(PARAMS, frozenset({"encoder.stages.0.conv.weight"})) == {
        "encoder.stages.1.conv.weight", "decoder.stages.0.conv.weight"}


def test_spared_parameters_train_unless_freeze_reinit():
    fresh = {"encoder.stages.1.conv.weight", "decoder.stages.0.conv.weight"}  # 24 + 5 scalars
    trains = {"decoder.stages.0.conv.weight", SEG}
    names, counts = spare_not_transferred(PARAMS, fresh, trains, freeze_reinit=False)
    assert names == trains | {"encoder.stages.1.conv.weight"}
    assert counts == {"tensors": 2, "parameters": 29, "trained_in_full_by_rule": 24, "frozen_by_freeze_reinit": 0}
    names, counts = spare_not_transferred(PARAMS, fresh, trains, freeze_reinit=True)
    assert names == trains
    assert counts == {"tensors": 2, "parameters": 29, "trained_in_full_by_rule": 0, "frozen_by_freeze_reinit": 24}
    names, counts = spare_not_transferred(PARAMS, fresh, None, freeze_reinit=False)  # everything trains already
    assert names is None and counts["trained_in_full_by_rule"] == 0 and counts["parameters"] == 29


def test_the_log_line_names_each_rule_that_applied():
    assert not_transferred_text(None) is None
    assert not_transferred_text({"tensors": 0, "parameters": 0}) is None
    base = {"tensors": 2, "parameters": 1234, "trained_in_full_by_rule": 0, "frozen_by_freeze_reinit": 0}
    assert not_transferred_text(base) == ("1,234 parameters in 2 tensors did not come from the source (re-initialised "
                                          "or new in the `weights adapt` report): they train as every other parameter")
    text = not_transferred_text({**base, "trained_in_full_by_rule": 1000, "l2sp_beta": 1234,
                                 "lora_convs_without_adapter": 3})
    assert text.endswith(": 1,000 would be frozen by this strategy and train in full; L2-SP anchors none of them, "
                         "1,234 are in its beta group; 3 convolution(s) train in full instead of carrying adapters")
    assert not_transferred_text({**base, "frozen_by_freeze_reinit": 24}).endswith(
        ": 24 stay frozen (freeze_reinit=true)")
