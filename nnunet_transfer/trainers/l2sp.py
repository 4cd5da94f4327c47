r"""L2-SP fine-tuning: a penalty toward the pretrained weights on a block-spec scope.

Cost(θ) = Loss(θ) + α‖θ_S − θ̄_S‖² (+ β‖θ_N‖² on the trainable parameters N outside the scope), with
θ̄ the network right after ``-pretrained_weights`` were loaded (Sagie, Greenspan & Goldberger 2021;
Li, Grandvalet & Davoine 2018, who write (α/2)‖·‖²: their α = 0.01 is l2sp_alpha = 0.005 here). α = 0 is plain fine-tuning; α = inf freezes the
scope (done by freezing, not by a huge number). The penalty gradient is added after backward (and
after AMP unscaling) and before nnU-Net's gradient clipping, so clipping and SGD see the gradient of
the whole objective; see :mod:`nnunet_transfer.policies.l2sp`.

Settings: ``l2sp_alpha``, ``l2sp_beta`` (null = nnU-Net's weight decay outside the scope),
``l2sp_scope`` (block spec, default ``encoder``), ``l2sp_anchor`` (``all`` parameters of the scope, or
only the conv ``kernels`` as Li et al.'s reference implementation), ``decoder_init`` (``pretrained`` |
``random``), ``allow_random_anchor`` (runs without any pretrained weights). Parameters that did not come from
the source (re-initialised or new after ``weights adapt``) are never anchored: they join the β group (L2 toward 0,
or nnU-Net's weight decay with ``l2sp_beta`` null), as Li et al. treat the layers new to the target. Per epoch the penalty and the scope's relative distance ‖θ − θ̄‖/‖θ̄‖ go to
the training log and to ``l2sp_log.json`` in the fold folder.
"""
from __future__ import annotations

import json
import math
import os

from torch import nn

from nnunet_transfer.blocks import BlockModel
from nnunet_transfer.config import TransferConfig
from nnunet_transfer.errors import ConfigError, TransferError
from nnunet_transfer.fileio import write_atomic
from nnunet_transfer.netutil import kernel_names, unwrap
from nnunet_transfer.nnunet_compat import reinitialise
from nnunet_transfer.policies.l2sp import L2SPPenalty, param_groups
from nnunet_transfer.trainers.base import BASE_KEYS, nnUNetTrainerTransferBase

L2SP_KEYS = BASE_KEYS | frozenset(TransferConfig.keys("l2sp"))
LOG_FILE = "l2sp_log.json"


class nnUNetTrainerL2SP(nnUNetTrainerTransferBase):
    """L2-SP with configurable α, β, scope and decoder initialisation (defaults: α = 0.01 on the encoder,
    decoder from the checkpoint, LR halved like ``nnUNetTrainerFinetune`` so that α = 0 reproduces it)."""

    transfer_defaults = {"lr_scale": 0.5, "l2sp_alpha": 0.01, "l2sp_scope": "encoder"}
    transfer_keys = L2SP_KEYS

    # set in configure_optimizers; no __init__ override: nnU-Net rebuilds trainers from the fixed
    # __init__ signature (it reads the parameter names back from locals())
    l2sp: L2SPPenalty | None = None
    _scope_names: frozenset[str] = frozenset()  # the scope's parameters that came from the source
    _scope_not_transferred: frozenset[str] = frozenset()

    @classmethod
    def check_config(cls, cfg, configuration):
        super().check_config(cfg, configuration)
        if math.isinf(cfg.l2sp_alpha) and cfg.l2sp_beta is not None:
            raise ConfigError("l2sp_alpha=inf freezes the scope, so there is no anchored term; l2sp_beta "
                              "is not supported with it (remove l2sp_beta to keep weight decay elsewhere)")

    # ------------------------------------------------------------------ scope and optimizer
    def _scope(self, model: BlockModel) -> set[str]:
        names = model.param_names(self.transfer_config.l2sp_scope)
        if self.transfer_config.decoder_init == "random":
            decoder = set(model.param_names("decoder"))
            if names & decoder:
                raise ConfigError(f"decoder_init=random re-initialises the decoder, but l2sp_scope="
                                  f"{self.transfer_config.l2sp_scope!r} anchors decoder blocks; anchor the "
                                  f"encoder only (l2sp_scope=encoder) or keep decoder_init=pretrained")
        return names

    @classmethod
    def needs_pretrained(cls, cfg):
        if cfg.l2sp_alpha > 0 and not cfg.allow_random_anchor:
            return (f"L2-SP with l2sp_alpha={cfg.l2sp_alpha} pulls the scope toward the PRETRAINED weights, but no "
                    f"pretrained weights were loaded (the anchor would be the random init). Add "
                    f"-pretrained_weights SOURCE_CHECKPOINT, or set allow_random_anchor=true if that is intended")
        return super().needs_pretrained(cfg)

    def _anchored(self, net: nn.Module, scope: set[str]) -> set[str]:
        """What of the scope is anchored: everything (``l2sp_anchor=all``) or the conv/linear kernels."""
        if self.transfer_config.l2sp_anchor == "kernels":
            return scope & kernel_names(net)
        return scope

    def _trainable_names(self, net: nn.Module) -> set[str] | None:
        model = self.blocks
        # what did not come from the source is never anchored (nor frozen by alpha=inf): it joins the beta group,
        # as Li et al. treat the layers new to the target
        fresh = self.not_transferred(net)
        scope = self._scope(model)
        self._scope_names = frozenset(scope - fresh)
        self._scope_not_transferred = frozenset(scope & fresh)
        if math.isinf(self.transfer_config.l2sp_alpha):
            # α → ∞ is the frozen scope: freeze it for real (no gradient, no optimizer state)
            return set(model.all_param_names) - self._scope_names
        return None

    def _param_groups(self, trainable: dict[str, nn.Parameter]) -> list[dict]:
        cfg = self.transfer_config
        if math.isinf(cfg.l2sp_alpha):
            self.l2sp = None
            return super()._param_groups(trainable)
        net = unwrap(self.network)
        anchored = self._anchored(net, set(self._scope_names)) & set(trainable)
        if not anchored and self._scope_not_transferred:
            raise TransferError(f"l2sp_scope={cfg.l2sp_scope!r}: none of its parameters came from the pretrained "
                                f"weights (all {len(self._scope_not_transferred)} tensors are re-initialised or new "
                                f"after `weights adapt`), so there is nothing to anchor; anchor blocks that were "
                                f"transferred (see the adapt report) or use nnUNetTrainerFinetune")
        self.l2sp = L2SPPenalty.from_named_parameters(trainable.items(), anchored, alpha=cfg.l2sp_alpha,
                                                      beta=cfg.l2sp_beta, scope=self._scope_names)
        nt = self.transfer_state.get("not_transferred")
        if nt is not None:
            sizes = {n: p.numel() for n, p in trainable.items()}
            beta = set(self.l2sp.new_names)
            nt["l2sp_not_anchored"] = sum(sizes[n] for n in self._scope_not_transferred if n in sizes)
            nt["l2sp_beta"] = sum(sizes[n] for n in self.not_transferred(net) if n in beta)
        return param_groups(trainable.values(), self.l2sp, weight_decay=self.weight_decay)

    # ------------------------------------------------------------------ start: anchor
    def _on_weights_ready(self, pretrained_loaded: bool) -> None:
        cfg = self.transfer_config
        if not pretrained_loaded and cfg.l2sp_alpha > 0 and not cfg.allow_random_anchor:
            raise TransferError(self.needs_pretrained(cfg))  # in-process use (no nnUNetv2_train command line)
        if cfg.decoder_init == "random":
            net = unwrap(self.network)
            modules = [net.get_submodule(m) for m in self.blocks.module_names("decoder")]
            n = reinitialise(modules)
            self.print_to_log_file(f"nnunet_transfer: decoder re-initialised ({n} layers, nnU-Net's init): "
                                   f"trained from scratch as in Sagie et al.")
        if self.l2sp is not None:
            self.l2sp.capture()
            self.print_to_log_file(f"nnunet_transfer: L2-SP anchor captured on {len(self.l2sp.anchored_names)} "
                                   f"tensors of scope {cfg.l2sp_scope!r} ({cfg.l2sp_anchor} parameters; "
                                   f"alpha={cfg.l2sp_alpha}, beta={cfg.l2sp_beta})"
                                   + (f"; {len(self._scope_not_transferred)} tensors of the scope did not come from "
                                      f"the source and are not anchored (beta group)"
                                      if self._scope_not_transferred else ""))
        elif math.isinf(cfg.l2sp_alpha):
            self.print_to_log_file(f"nnunet_transfer: l2sp_alpha=inf: scope {cfg.l2sp_scope!r} frozen")

    # ------------------------------------------------------------------ step and logging
    def _gradient_penalty(self):
        return self.l2sp

    def _after_epoch(self, epoch: int) -> None:
        if self.l2sp is None or self.local_rank != 0:
            return
        value = self.l2sp.penalty_value()
        dist = self.l2sp.relative_distance()
        self.print_to_log_file(f"nnunet_transfer: L2-SP penalty {value:.6g}, relative distance of the scope "
                               f"{dist.overall:.4g} (mean per tensor {dist.per_tensor_mean:.4g})")
        path = os.path.join(self.output_folder, LOG_FILE)
        entries = json.load(open(path)) if os.path.isfile(path) else []
        entries = [e for e in entries if e["epoch"] < epoch]
        entries.append({"epoch": epoch, "penalty": value, "relative_distance": dist.overall,
                        "relative_distance_per_tensor_mean": dist.per_tensor_mean})
        write_atomic(path, json.dumps(entries, indent=1))

    # ------------------------------------------------------------------ checkpoint
    def _checkpoint_extras(self) -> dict:
        if self.l2sp is not None and self.l2sp.captured:
            return {"l2sp_anchor": self.l2sp.state_dict()}
        return {}

    def _restore_checkpoint_extras(self, state: dict) -> None:
        if self.l2sp is not None:
            if "l2sp_anchor" not in state:
                raise TransferError("this L2-SP checkpoint holds no anchor; it cannot be resumed (the anchor "
                                    "must never be re-captured from fine-tuned weights)")
            # never re-captured from fine-tuned weights: the anchor comes back from the checkpoint
            self.l2sp.load_state_dict(state["l2sp_anchor"])


class nnUNetTrainerL2SP_Sagie(nnUNetTrainerL2SP):
    """Sagie et al. 2021: λ‖θ_enc − θ̄_enc‖² on the encoder, decoder trained from scratch; λ = 8 was best
    with a medically pretrained encoder in the paper (sweep it: ``configure ... --set l2sp_alpha=…``).

    nnU-Net's initial LR as it is (``lr_scale=1``, not the halved LR of ``nnUNetTrainerL2SP``): the paper
    changes the objective only, it scales no learning rate. Under nnU-Net's SGD (momentum 0.99) and Dice + CE
    loss λ has another scale than in the paper: examples/sagie/README.md measures where it matters."""

    transfer_defaults = {**nnUNetTrainerL2SP.transfer_defaults, "l2sp_alpha": 8.0,
                         "decoder_init": "random", "lr_scale": 1.0}


class nnUNetTrainerL2SP_Li(nnUNetTrainerL2SP):
    """Li et al. 2018 as their reference implementation does it: the convolution kernels of every
    transferred layer (encoder + decoder) are anchored, biases and normalisation parameters are not
    (they keep nnU-Net's weight decay); β pulls the new layers (the heads) toward zero.

    Li et al. write the penalty as (α/2)‖w − w⁰‖² + (β/2)‖w̄‖² with α = β = 0.01; this package has no ½
    (Sagie's form), so the same objective is l2sp_alpha = l2sp_beta = 0.005 here."""

    transfer_defaults = {**nnUNetTrainerL2SP.transfer_defaults, "l2sp_alpha": 0.005, "l2sp_beta": 0.005,
                         "l2sp_scope": "encoder+decoder", "l2sp_anchor": "kernels"}


__all__ = ["nnUNetTrainerL2SP", "nnUNetTrainerL2SP_Sagie", "nnUNetTrainerL2SP_Li"]
