"""The architecture family of a state dict, read from its names (:mod:`nnunet_transfer.plans.family`)."""
from __future__ import annotations

import pytest
import torch

from nnunet_transfer.errors import ArchitectureError
from nnunet_transfer.plans.family import _family, _n_stages, _spatial_dims, check_family


def state(*names: str, ndim: int = 5) -> dict[str, torch.Tensor]:
    return {n: torch.zeros((1,) * (ndim if n.endswith("conv.weight") else 1)) for n in names}


PLAIN = state("encoder.stages.0.0.convs.0.conv.weight", "encoder.stages.1.0.convs.0.conv.weight",
              "decoder.stages.0.convs.0.conv.weight")
RESENC = state("encoder.stem.convs.0.conv.weight", "encoder.stages.0.blocks.0.conv1.conv.weight",
               "decoder.stages.0.convs.0.conv.weight")
RESIDUAL = state("encoder.stem.convs.0.conv.weight", "encoder.stages.0.blocks.0.conv1.conv.weight",
                 "decoder.stages.0.blocks.0.conv1.conv.weight")


@pytest.mark.parametrize("names, family", [(PLAIN, ("plain", "plain")), (RESENC, ("residual", "plain")),
                                           (RESIDUAL, ("residual", "residual")), ({"blocks.0.weight": 0}, (None, None))])
def test_family_is_read_from_the_names(names, family):
    assert _family(names) == family


def test_stage_count_and_dimension():
    assert _n_stages(PLAIN) == 2 and _n_stages({"decoder.stages.0.x": 0}) == 0
    assert _spatial_dims(PLAIN) == {3} and _spatial_dims(state(*PLAIN, ndim=4)) == {2}


def test_same_family_passes_and_others_are_refused_naming_both():
    check_family(PLAIN, PLAIN)
    with pytest.raises(ArchitectureError, match=r"the checkpoint is a PlainConvUNet \(plain encoder, plain decoder\), "
                                                r"the target a ResidualEncoderUNet .* the encoder of different families"):
        check_family(PLAIN, RESENC)
    with pytest.raises(ArchitectureError, match=r"the encoder and decoder of different families"):
        check_family(PLAIN, RESIDUAL)
    with pytest.raises(ArchitectureError, match=r"a 3-D network, the target 2-D"):
        check_family(PLAIN, state(*PLAIN, ndim=4))
    with pytest.raises(ArchitectureError, match=r"holds no U-Net .* first keys \['blocks.0.weight'\]"):
        check_family({"blocks.0.weight": torch.zeros(1)}, PLAIN)
