"""A run's record without a trainer: parameter counts of a frozen U-Net, the start lines, transfer_config.json."""
from __future__ import annotations

import json

from nnunet_transfer.blocks import BlockModel
from nnunet_transfer.policies.freezing import apply_freeze
from nnunet_transfer.training.run_record import (CONFIG_FILE, all_trainable_counts, config_file_content, drift_line,
                                                 parameter_counts, settings_line, start_lines, write_config_file)
from nets import unet


def test_parameter_counts_of_a_frozen_encoder():
    net = unet(n=3, seed=0)
    model = BlockModel.from_network(net)
    encoder = {n for n, _ in net.named_parameters() if n.startswith("encoder.")}
    names = {n for n, _ in net.named_parameters()} - encoder
    report = apply_freeze(net, names)
    counts = parameter_counts(report, model, names)
    sizes = {n: p.numel() for n, p in net.named_parameters()}
    frozen = sum(sizes[n] for n in encoder)
    assert (counts["trainable"], counts["frozen"], counts["total"]) == (
        sum(sizes.values()) - frozen, frozen, sum(sizes.values()))
    assert counts["frozen_blocks"] == [b.number for b in model.blocks if set(b.param_names) <= encoder]
    assert counts["trainable_blocks"] == [b.number for b in model.blocks if not set(b.param_names) & encoder]
    assert counts["frozen_blocks"] and counts["trainable_blocks"] and counts["seg_trainable"] is True
    assert all_trainable_counts(net.parameters()) == {"trainable": sum(sizes.values()), "frozen": 0,
                                                      "total": sum(sizes.values()), "trainable_blocks": "all"}


STATE = {"pretrained_loaded": True, "pretrained_source": "/x/source.pth", "transfer": None,
         "heads": {"copied": [{"target": "liver"}, {"target": "tumour"}]},
         "parameters": {"trainable": 1500, "frozen": 2500, "total": 4000},
         "not_transferred": {"tensors": 1, "parameters": 10, "trained_in_full_by_rule": 10,
                             "frozen_by_freeze_reinit": 0}}


def test_start_lines_say_where_the_weights_came_from_and_what_trains():
    lines = start_lines(STATE)
    assert lines[0] == ("pretrained weights loaded from /x/source.pth (all layers; segmentation-head rows of liver, "
                        "tumour from the checkpoint)")
    assert lines[1] == "trainable parameters 1,500 of 4,000 (frozen 2,500)"
    assert lines[2].startswith("10 parameters in 1 tensors did not come from the source")
    scratch = start_lines({**STATE, "pretrained_loaded": False, "not_transferred": None})
    assert scratch == ["no pretrained weights were loaded; the network starts from its random initialisation",
                       "trainable parameters 1,500 of 4,000 (frozen 2,500)"]
    assert start_lines({**STATE, "pretrained_source": None, "heads": None})[0] == (
        "pretrained weights loaded (all layers but the segmentation heads)")
    record = {"kind": "adapted", "origin": "nnssl", "source": "/x/source.pth", "file": "/x/source.pth",
              "total": {"params": 10, "from_source": 5, "share": 0.5}, "blocks": []}
    nnssl = start_lines({**STATE, "heads": None, "transfer": record})
    assert nnssl[:2] == ["pretrained weights loaded from /x/source.pth (the encoder and stem of an nnssl checkpoint; "
                         "the decoder and heads as nnU-Net initialised them)",
                         "encoder and stem of the nnssl checkpoint /x/source.pth: 50.0% of the 10 parameters outside "
                         "the heads came from it; the decoder and the heads start fresh"]


def test_settings_and_drift_lines():
    assert settings_line("T", {"seed": 1, "num_epochs": 5, "lora_rank": 8}, ["num_epochs", "seed"]) == (
        'nnunet_transfer settings (T): {"num_epochs": 5, "seed": 1}')
    assert drift_line({"encoder": 0.0, "decoder": 0.123456, "seg": None}) == (
        "moved from the start, ||theta - theta_0|| / ||theta_0||: encoder 0, decoder 0.1235")


def test_config_file_holds_settings_and_state(tmp_path):
    content = config_file_content(trainer="T", configuration="ft", settings={"seed": 1}, settings_used=["seed"],
                                  transfer_state={"pretrained_loaded": False, "stopping": {"converged": True}})
    path = write_config_file(tmp_path, content)
    assert path.name == CONFIG_FILE and path.parent == tmp_path
    assert json.loads(path.read_text()) == {"trainer": "T", "configuration": "ft", "settings": {"seed": 1},
                                            "settings_used": ["seed"], "pretrained_loaded": False,
                                            "stopping": {"converged": True}}
    assert not list(tmp_path.glob("*.tmp*"))  # written whole: nothing left beside it
