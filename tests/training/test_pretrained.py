"""Load detection without a command line: the fingerprint of the fresh network vs after a load."""
from __future__ import annotations

import torch

from nnunet_transfer.netutil import unique_named_parameters
from nnunet_transfer.training.pretrained import weights_changed, weights_fingerprint
from nets import unet


def test_fingerprint_is_sum_plus_l1_per_unique_tensor_in_float64():
    net = unet(n=3, seed=0)
    fp = weights_fingerprint(net)
    params = unique_named_parameters(net)
    want = torch.tensor([float(p.detach().double().sum() + p.detach().double().abs().sum()) for p in params.values()],
                        dtype=torch.float64)
    assert fp.dtype == torch.float64 and fp.shape == (len(params),)  # aliases (decoder.encoder) counted once
    assert torch.allclose(fp, want, rtol=1e-5, atol=1e-5)


def test_a_load_of_other_weights_is_detected_and_the_same_weights_are_not():
    net = unet(n=3, seed=0)
    fresh = weights_fingerprint(net)
    assert not weights_changed(fresh, net)
    net.load_state_dict(unet(n=3, seed=0).state_dict())  # the same values: no pretrained weights
    assert not weights_changed(fresh, net)
    net.load_state_dict(unet(n=3, seed=1).state_dict())
    assert weights_changed(fresh, net)
    assert not weights_changed(None, net)  # no fingerprint taken (initialize never ran): nothing is claimed


def test_one_changed_scalar_is_detected():
    net = unet(n=3, seed=0)
    fresh = weights_fingerprint(net)
    with torch.no_grad():
        next(iter(unique_named_parameters(net).values())).view(-1)[0] += 0.5
    assert weights_changed(fresh, net)
