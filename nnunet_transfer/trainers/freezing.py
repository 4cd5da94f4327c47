"""Freezing strategies: Karimi et al. (2021) frozen encoder / frozen decoder, Amiri et al. (2020) block-wise.

What trains is a block spec (see :mod:`nnunet_transfer.blocks`); everything else is frozen in
``configure_optimizers`` (before any DDP wrap) and left out of the optimizer, so no weight decay or
momentum touches it. The segmentation heads train unless ``freeze_seg`` is set: nnU-Net never loads them
from ``-pretrained_weights``, so frozen they must come from the checkpoint (``heads``); a frozen head row
that nothing transfers is refused before the fold folder exists.

As the papers have it: Amiri et al.'s 1×1 output convolution belongs to block 2N−1, so a preset that leaves
that block out keeps the *pretrained* heads frozen (``heads=by-name``, ``freeze_seg=true``) and one that
includes it fine-tunes them from the pretrained rows; Karimi et al.'s frozen decoder fine-tunes "the encoder
and the last layer" from the pretrained network with the halved learning rate of every transfer run.

* Karimi, Warfield & Gholipour, "Transfer learning in medical image segmentation: new insights from
  analysis of the dynamics of model parameters and learned representations", AIIM 2021.
* Amiri, Brooks & Rivaz, "Fine-tuning U-Net for ultrasound image segmentation: different layers,
  different outcomes", IEEE TUFFC 2020.
"""
from __future__ import annotations

from nnunet_transfer.blocks import PRESETS
from nnunet_transfer.errors import ConfigError, TransferError
from nnunet_transfer.policies.freezing import reinit_zeroed_residual_norms
from nnunet_transfer.config import TransferConfig
from nnunet_transfer.trainers.base import BASE_KEYS, nnUNetTrainerTransferBase
from nnunet_transfer.training.pretrained import frozen_not_from_source

FREEZE_KEYS = BASE_KEYS | frozenset(TransferConfig.keys("freeze"))
BLOCKWISE_KEYS = FREEZE_KEYS | frozenset(TransferConfig.keys("blockwise"))


class _FreezingTrainer(nnUNetTrainerTransferBase):
    """A trainer whose ``trainable`` spec leaves blocks frozen: it refuses, before the fold folder exists, to
    freeze a block holding parameters that did not come from ``-pretrained_weights`` (re-initialised, not
    transferable or new in a ``weights adapt`` report) — a frozen random block is rarely meant — unless
    ``freeze_reinit`` is set."""

    #: the end of a refusal to freeze head rows that no checkpoint row transfers: how to proceed
    frozen_heads_fix = ("map them explicitly (--set heads=TARGET:SOURCE,...) or let the heads train "
                        "(--set freeze_seg=false)")
    #: why this strategy freezes the heads (inserted after "freezes the segmentation heads")
    frozen_heads_why = ""

    @classmethod
    def check_config(cls, cfg, configuration):
        super().check_config(cfg, configuration)
        if cfg.freeze_seg and cfg.heads == "new" and not cfg.freeze_reinit:
            raise ConfigError(f"{cls.__name__} freezes the segmentation heads{cls.frozen_heads_why}, so they must "
                              f"come from the checkpoint, but heads=new would freeze random heads; use "
                              f"heads=by-name or a mapping (--set heads=TARGET:SOURCE,...), or let the heads train "
                              f"(--set freeze_seg=false)")

    def check_pretrained_file(self, checked) -> None:
        super().check_pretrained_file(checked)
        plan = checked.heads
        if self.transfer_config.freeze_seg and plan is not None and plan.new:
            why = f" ({plan.fallback})" if plan.fallback else ""
            raise TransferError(
                f"{self.__class__.__name__} freezes the segmentation heads{self.frozen_heads_why}, but target "
                f"label(s) {', '.join(plan.new)} have no row in {checked.path} (its labels: "
                f"{', '.join(map(str, checked.source_labels or {})) or 'unknown'}){why}; frozen, they would stay "
                f"random. Fix: {self.frozen_heads_fix}")
        if self.transfer_config.freeze_reinit:
            return
        frozen = frozen_not_from_source(checked, self.trainable_spec())
        if frozen:
            blocks = "; ".join(f"block {b}: {len(n)} tensor(s), e.g. {n[0]}" for b, n in frozen.items())
            raise TransferError(
                f"{self.__class__.__name__} would freeze parameters that did not come from {checked.path} "
                f"(re-initialised or new when `weights adapt` mapped it to these plans) — {blocks}; frozen, they "
                f"stay random. Train those blocks (nnUNetTrainerPartialFT with --set trainable=SPEC including "
                f"blocks {','.join(map(str, frozen))}), or allow it: nnunet_transfer configure ... --set "
                f"freeze_reinit=true")


class nnUNetTrainerFrozenEncoder(_FreezingTrainer):
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
        encoder_modules = self.blocks.module_names("encoder")
        n = reinit_zeroed_residual_norms(self.network, encoder_modules)
        if n:
            # ResidualEncoderUNet zeroes the last norm of every residual block at init; frozen, those
            # branches would be dead forever
            self.print_to_log_file(f"nnunet_transfer: re-initialised {n} zeroed residual-branch norm "
                                   f"weights of the frozen random encoder to 1 (ResidualEncoderUNet "
                                   f"zeroes them at init, which would leave the residual branches dead)")
        self.transfer_state["reinitialised_residual_norms"] = n


class nnUNetTrainerFrozenDecoder(_FreezingTrainer):
    """Pretrained decoder frozen; encoder and segmentation heads train (Karimi's "encoder + last layer").

    As the paper: the heads start from the checkpoint's rows of the labels whose names agree
    (``heads=by-name``; a label the source lacks starts new; with no name in common every row starts new, said
    in the log), and the initial LR is halved (``lr_scale=0.5``) like every transfer run of Karimi et al.
    Needs ``-pretrained_weights``: a frozen random decoder is not a strategy.
    """

    transfer_defaults = {"trainable": "encoder", "heads": "by-name", "lr_scale": 0.5}
    transfer_keys = FREEZE_KEYS
    heads_fallback_new = True

    @classmethod
    def needs_pretrained(cls, cfg):
        return (f"{cls.__name__} keeps the PRETRAINED decoder frozen, but no pretrained weights were loaded; "
                f"add -pretrained_weights SOURCE_CHECKPOINT to nnUNetv2_train")

    def _on_weights_ready(self, pretrained_loaded: bool) -> None:
        if not pretrained_loaded:  # in-process use: the command line was not nnUNetv2_train's
            raise TransferError(self.needs_pretrained(self.transfer_config))


class nnUNetTrainerFrozenDecoderAndHeads(nnUNetTrainerFrozenDecoder):
    """Decoder *and* segmentation heads frozen at the pretrained weights; only the encoder trains.

    Karimi et al.'s second frozen-decoder variant. The heads come from the checkpoint by label name
    (``heads=by-name``; or a mapping target -> source label): every target label must have a source
    row, since a frozen head row that was never transferred would stay random for good.
    """

    transfer_defaults = {"trainable": "encoder", "freeze_seg": True, "heads": "by-name", "lr_scale": 0.5}
    transfer_keys = FREEZE_KEYS
    frozen_heads_fix = ("map them explicitly (heads=TARGET:SOURCE,...) or use nnUNetTrainerFrozenDecoder, whose "
                        "heads train")

    @classmethod
    def check_config(cls, cfg, configuration):
        if cfg.heads == "new":
            raise ConfigError(f"{cls.__name__} freezes the segmentation heads, so they must come from the "
                              f"checkpoint: heads=new would freeze random heads. Use heads=by-name (default) or a "
                              f"mapping, or nnUNetTrainerFrozenDecoder to train the heads")
        if not cfg.freeze_seg:
            raise ConfigError(f"{cls.__name__} freezes the heads (freeze_seg=true); to train them use "
                              f"nnUNetTrainerFrozenDecoder")
        super().check_config(cfg, configuration)


class nnUNetTrainerPartialFT(_FreezingTrainer):
    """Block-wise fine-tuning with the ``trainable`` spec of the configuration, e.g.
    ``nnunet_transfer configure ... --set trainable=blocks:1,2,8-9``."""

    transfer_keys = BLOCKWISE_KEYS

    @classmethod
    def check_config(cls, cfg, configuration):
        if cfg.trainable is None:
            raise ConfigError(
                f"{cls.__name__} needs the setting 'trainable' (a block spec such as 'blocks:1,2,8-9' "
                f"or a preset: {sorted(PRESETS)}); write it with nnunet_transfer configure -d D -c C "
                f"-n NEW --set trainable=SPEC, or use a preset trainer nnUNetTrainerPartialFT_<preset>")
        super().check_config(cfg, configuration)


class _AmiriPreset(_FreezingTrainer):
    """Base of the 12 preset trainers: all blocks outside the preset frozen. The segmentation heads are
    Amiri's 1×1 output convolution, part of block 2N−1: they start from the checkpoint's rows (``heads=by-name``,
    or a mapping) and train with that block; a preset without it keeps them frozen at the pretrained weights
    (``freeze_seg=true``) and refuses, before any folder, when a target label has no source row.
    ``freeze_seg=false`` trains them (new where no row transfers), which is not the paper's strategy."""

    transfer_keys = FREEZE_KEYS
    heads_fallback_new = True
    frozen_heads_why = (" at the pretrained weights (Amiri et al.: the output layer belongs to block 2N-1, which "
                        "this strategy leaves out)")
    frozen_heads_fix = ("map them (nnunet_transfer configure ... --set heads=TARGET:SOURCE,...), or train new heads "
                        "with --set freeze_seg=false (not the paper's strategy)")

    @classmethod
    def needs_pretrained(cls, cfg):
        if cfg.freeze_seg and cfg.heads != "new":
            return (f"{cls.__name__} keeps the segmentation heads frozen at the PRETRAINED weights, but no "
                    f"-pretrained_weights was given; add -pretrained_weights SOURCE_CHECKPOINT (or train new heads: "
                    f"--set freeze_seg=false heads=new, which is not the paper's strategy)")
        return super().needs_pretrained(cfg)


def _heads_train(preset: str) -> dict:
    """Defaults of a preset that includes block 2N−1: the pretrained heads fine-tune with it."""
    return {"trainable": preset, "heads": "by-name"}


def _heads_frozen(preset: str) -> dict:
    """Defaults of a preset that leaves block 2N−1 out: the pretrained heads stay frozen."""
    return {"trainable": preset, "heads": "by-name", "freeze_seg": True}


# Amiri et al.'s 12 strategies, one class each (the class name is the results folder's name). The
# blocks are those of nnunet_transfer.blocks.PRESETS for the network's stage count N; "N = 5" is the
# paper's 9-block U-Net.
class nnUNetTrainerPartialFT_whole(_AmiriPreset):
    """Amiri #1: every block (1..2N−1) fine-tuned."""
    transfer_defaults = _heads_train("whole")


class nnUNetTrainerPartialFT_contracting(_AmiriPreset):
    """Amiri #2: the contracting half, blocks 1..N−1 and the first half of the bottleneck (N = 5: 1–4 + 5a)."""
    transfer_defaults = _heads_frozen("contracting")


class nnUNetTrainerPartialFT_expanding(_AmiriPreset):
    """Amiri #3: the expanding half, the second half of the bottleneck and blocks N+1..2N−1 (5b + 6–9)."""
    transfer_defaults = _heads_train("expanding")


class nnUNetTrainerPartialFT_exceptBottleneck(_AmiriPreset):
    """Amiri #4: every block but the bottleneck N (N = 5: 1–4, 6–9)."""
    transfer_defaults = _heads_train("exceptBottleneck")


class nnUNetTrainerPartialFT_bottleneck(_AmiriPreset):
    """Amiri #5: the bottleneck N only."""
    transfer_defaults = _heads_frozen("bottleneck")


class nnUNetTrainerPartialFT_outer(_AmiriPreset):
    """Amiri #6: the two outer levels on both sides, {1, 2, 2N−2, 2N−1} (N ≥ 4)."""
    transfer_defaults = _heads_train("outer")


class nnUNetTrainerPartialFT_inner(_AmiriPreset):
    """Amiri #7: all but the two outer levels, 3..2N−3 (N ≥ 4)."""
    transfer_defaults = _heads_frozen("inner")


class nnUNetTrainerPartialFT_first(_AmiriPreset):
    """Amiri #8: block 1."""
    transfer_defaults = _heads_frozen("first")


class nnUNetTrainerPartialFT_last(_AmiriPreset):
    """Amiri #9: block 2N−1 (the usual "fine-tune the last layers")."""
    transfer_defaults = _heads_train("last")


class nnUNetTrainerPartialFT_firstLast(_AmiriPreset):
    """Amiri #10: blocks 1 and 2N−1."""
    transfer_defaults = _heads_train("firstLast")


class nnUNetTrainerPartialFT_first2(_AmiriPreset):
    """Amiri #11: the first half of the contracting path, 1..⌈(N−1)/2⌉ (N = 5: 1, 2; N ≥ 4)."""
    transfer_defaults = _heads_frozen("first2")


class nnUNetTrainerPartialFT_deepEncoder(_AmiriPreset):
    """Amiri #12: the second half of the contracting path, ⌈(N−1)/2⌉+1..N−1 (N = 5: 3, 4; N ≥ 4)."""
    transfer_defaults = _heads_frozen("deepEncoder")


PRESET_TRAINERS = {cls.transfer_defaults["trainable"]: cls for cls in _AmiriPreset.__subclasses__()}

__all__ = ["nnUNetTrainerFrozenEncoder", "nnUNetTrainerFrozenDecoder", "nnUNetTrainerFrozenDecoderAndHeads",
           "nnUNetTrainerPartialFT", *(cls.__name__ for cls in PRESET_TRAINERS.values())]
