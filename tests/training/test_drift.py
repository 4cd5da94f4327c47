"""Drift of encoder, decoder and heads from a start file, against an independent computation."""
from __future__ import annotations

import math

import torch

from nnunet_transfer.blocks import BlockModel
from nnunet_transfer.training.drift import drift_from_file, part_names
from nnunet_transfer.training.snapshots import START_FILE, save_weights
from nets import unet


def test_drift_from_the_start_file(tmp_path):
    net = unet(n=3, seed=0)
    model = BlockModel.from_network(net)
    assert drift_from_file(model, tmp_path / START_FILE, dict(net.named_parameters())) is None  # no start file
    save_weights(net, tmp_path / START_FILE, trainer_name="T", epoch=0)
    start = {n: p.detach().clone() for n, p in net.named_parameters()}
    with torch.no_grad():
        for n, p in net.named_parameters():
            if n in part_names(model)["decoder"]:
                p.mul_(1.5)  # every decoder tensor moves by half of itself: drift 0.5 exactly
    drift = drift_from_file(model, tmp_path / START_FILE, dict(net.named_parameters()))
    assert drift["encoder"] == 0.0 and drift["seg"] == 0.0
    names = part_names(model)["decoder"]
    now = {n: p.detach().double() for n, p in net.named_parameters()}
    num = sum(float(((now[n] - start[n].double()) ** 2).sum()) for n in names)
    den = sum(float((start[n].double() ** 2).sum()) for n in names)
    assert math.isclose(drift["decoder"], math.sqrt(num / den), rel_tol=1e-9)
    assert math.isclose(drift["decoder"], 0.5, rel_tol=1e-6)
