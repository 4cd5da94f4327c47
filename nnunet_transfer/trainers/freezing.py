"""Freezing strategies: Karimi et al. (2021) frozen encoder / frozen decoder, Amiri et al. (2020) block-wise.

What trains is a block spec (see :mod:`nnunet_transfer.blocks`); everything else is frozen in
``configure_optimizers`` (before any DDP wrap) and left out of the optimizer, so no weight decay or
momentum touches it. The segmentation heads always train unless ``freeze_seg`` is set: nnU-Net never
loads them from ``-pretrained_weights``.

* Karimi, Warfield & Gholipour, "Transfer learning in medical image segmentation: new insights from
  analysis of the dynamics of model parameters and learned representations", AIIM 2021.
* Amiri, Brooks & Rivaz, "Fine-tuning U-Net for ultrasound image segmentation: different layers,
  different outcomes", IEEE TUFFC 2020.
"""
from __future__ import annotations

from nnunet_transfer.blocks import PRESETS, BlockModel
from nnunet_transfer.errors import ConfigError, TransferError
from nnunet_transfer.netutil import unwrap
from nnunet_transfer.policies.freezing import reinit_zeroed_residual_norms
from nnunet_transfer.trainers.base import BASE_KEYS, nnUNetTrainerTransferBase

FREEZE_KEYS = BASE_KEYS | {"freeze_seg"}


class nnUNetTrainerFrozenEncoder(nnUNetTrainerTransferBase):
    """Encoder (blocks 1..N, bottleneck included) frozen; decoder and heads train.

    Without ``-pretrained_weights`` the encoder stays at its *random* initialisation (Karimi's random
    frozen encoder; set ``seed`` to make it reproducible); with them it is the frozen pretrained encoder.
    """

    transfer_defaults = {"trainable": "decoder"}
    transfer_keys = FREEZE_KEYS

    def _on_weights_ready(self, pretrained_loaded: bool) -> None:
        if pretrained_loaded:
            self.print_to_log_file("nnunet_transfer: encoder frozen at the PRETRAINED weights")
            return
        self.print_to_log_file("nnunet_transfer: encoder frozen at its RANDOM initialisation "
                               f"(seed={self.transfer_config.seed}); only the decoder and heads train")
        model = BlockModel.from_network(self.network)
        encoder_modules = model.module_names("encoder")
        n = reinit_zeroed_residual_norms(self.network, encoder_modules)
        if n:
            # ResidualEncoderUNet zeroes the last norm of every residual block at init; frozen, those
            # branches would be dead forever
            self.print_to_log_file(f"nnunet_transfer: re-initialised {n} zeroed residual-branch norm "
                                   f"weights of the frozen random encoder to 1 (ResidualEncoderUNet "
                                   f"zeroes them at init, which would leave the residual branches dead)")
        self.transfer_state["reinitialised_residual_norms"] = n


class nnUNetTrainerFrozenDecoder(nnUNetTrainerTransferBase):
    """Pretrained decoder frozen; encoder and segmentation heads train (Karimi's encoder + last layer).

    Needs ``-pretrained_weights``: a frozen random decoder is not a strategy.
    """

    transfer_defaults = {"trainable": "encoder"}
    transfer_keys = FREEZE_KEYS

    def _on_weights_ready(self, pretrained_loaded: bool) -> None:
        if not pretrained_loaded:
            raise TransferError(
                "nnUNetTrainerFrozenDecoder keeps the PRETRAINED decoder frozen, but no pretrained "
                "weights were loaded; add -pretrained_weights SOURCE_CHECKPOINT to nnUNetv2_train")


class nnUNetTrainerPartialFT(nnUNetTrainerTransferBase):
    """Block-wise fine-tuning with the ``trainable`` spec of the configuration, e.g.
    ``nnunet_transfer configure ... --set trainable=blocks:1,2,8-9``."""

    transfer_keys = FREEZE_KEYS | {"trainable"}

    @classmethod
    def check_config(cls, cfg, configuration):
        if cfg.trainable is None:
            raise ConfigError(
                f"{cls.__name__} needs the setting 'trainable' (a block spec such as 'blocks:1,2,8-9' "
                f"or a preset: {sorted(PRESETS)}); write it with nnunet_transfer configure -d D -c C "
                f"-n NEW --set trainable=SPEC, or use a preset trainer nnUNetTrainerPartialFT_<preset>")
        super().check_config(cfg, configuration)


def _preset_trainer(name: str) -> type:
    preset = PRESETS[name]
    doc = (f"Amiri strategy {preset.amiri}: fine-tune preset ``{name}`` (blocks "
           f"{preset.blocks(5) and sorted(preset.blocks(5))} of a 5-stage U-Net; any stage count, see "
           f"nnunet_transfer.blocks); all other blocks frozen, segmentation heads train.")
    return type(f"nnUNetTrainerPartialFT_{name}", (nnUNetTrainerTransferBase,),
                {"__doc__": doc, "__module__": __name__, "transfer_defaults": {"trainable": name},
                 "transfer_keys": FREEZE_KEYS})


PRESET_TRAINERS = {name: _preset_trainer(name) for name in PRESETS}
globals().update({cls.__name__: cls for cls in PRESET_TRAINERS.values()})

__all__ = ["nnUNetTrainerFrozenEncoder", "nnUNetTrainerFrozenDecoder", "nnUNetTrainerPartialFT",
           *(cls.__name__ for cls in PRESET_TRAINERS.values())]
