"""Selective parameter-efficient baselines (train a chosen subset of the parameters, by kind): norm-only and BitFit.

Both are block-spec declarations (see the kinds in :mod:`nnunet_transfer.blocks`) over the freezing machinery:
every other parameter is frozen in ``configure_optimizers`` and left out of the optimizer; the segmentation
heads train (nnU-Net re-initialises them), and so does every parameter that did not come from the source
(re-initialised or new after ``weights adapt``) unless ``freeze_reinit``. Any other kind selection is a ``trainable`` spec of
``nnUNetTrainerPartialFT`` (e.g. ``--set trainable=decoder+encoder:norm``).

* norm-only: the affine parameters of the normalisation layers (InstanceNorm in nnU-Net) — cheap, strong
  baseline for domain shift (cf. AdaBN, Li et al. 2016; "tuning LayerNorm", Zhao et al. 2023).
* BitFit: every bias term (Ben Zaken, Goldberg & Ravfogel, "BitFit: Simple Parameter-efficient Fine-tuning for
  Transformer-based Masked Language-models", ACL 2022) — conv biases and the norms' shifts.
"""
from __future__ import annotations

from nnunet_transfer.trainers.base import nnUNetTrainerTransferBase
from nnunet_transfer.trainers.freezing import FREEZE_KEYS


class nnUNetTrainerNormOnly(nnUNetTrainerTransferBase):
    """Only the normalisation layers' weight and bias (+ the heads) train: spec ``all:norm+seg``."""

    transfer_defaults = {"trainable": "all:norm+seg"}
    transfer_keys = FREEZE_KEYS


class nnUNetTrainerBitFit(nnUNetTrainerTransferBase):
    """Only the biases (+ the heads) train: spec ``all:bias+seg`` (BitFit)."""

    transfer_defaults = {"trainable": "all:bias+seg"}
    transfer_keys = FREEZE_KEYS


__all__ = ["nnUNetTrainerNormOnly", "nnUNetTrainerBitFit"]
