"""``nnUNetTrainerLoRA``: low-rank adapters on the convolutions (and linear layers) of a block spec; the base
kernels stay frozen. On a Primus the targets are its attention q/k/v/proj and MLP linears, the patch embedding and
the up-projection's transposed convolutions.

Settings: ``lora_targets`` (block spec, default ``encoder+decoder``: every conv and transposed conv of the
U-Net but the heads), ``lora_rank`` r, ``lora_alpha`` α (the update is (α/r)·B·A, see
:mod:`nnunet_transfer.policies.lora`), ``trainable`` (optional: parameters trained in full besides the
adapters, e.g. ``all:norm``). The segmentation heads always train (nnU-Net re-initialises them).

Where it happens in nnU-Net's order of events:

* ``__init__``: the spec must select convolutions, ``lora_rank`` must fit every one of them (1 ≤ r ≤
  min(d1, d2) of its kernel matrix) — checked on the planned network (meta device) before any folder exists.
* ``configure_optimizers`` (after build and compile, before the DDP wrap): adapters are added in place, then
  everything but the adapters (+ heads, + ``trainable``) is frozen as in the freezing trainers. Only
  convolutions that came from the source get adapters: one re-initialised or new after ``weights adapt`` trains
  in full, like every parameter not from the source (``freeze_reinit=true``: adapted on its frozen random base).
* ``-pretrained_weights``: nnU-Net's own loader runs unchanged — the adapted network's ``state_dict`` is the
  plain network's (merged kernels, plain keys), and loading a plain kernel sets the base (B = 0 at start).
* Checkpoints: ``network_weights`` holds the **merged** weights under the plain keys, so ``nnUNetv2_predict``
  (which builds this class's stock ``build_network_architecture``, a plain U-Net) runs them unchanged, and
  every checkpoint is a valid ``-pretrained_weights`` file. The exact training state (base kernels W₀,
  A, B) travels under the ``"nnunet_transfer"`` key and is restored by ``--c`` in place.
* End of training: ``lora_adapters.pth`` (adapters + heads + digests of the frozen base + nnU-Net's
  metadata) next to ``checkpoint_final.pth``; ``nnunet_transfer lora merge`` rebuilds a full checkpoint
  from it and the base checkpoint.
"""
from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from nnunet_transfer.blocks import BlockModel
from nnunet_transfer.checkpoints import compare, load_weights, read_checkpoint
from nnunet_transfer.config import TransferConfig
from nnunet_transfer.errors import ConfigError, DataError, TransferError
from nnunet_transfer.fileio import save_atomic
from nnunet_transfer.netutil import unwrap
from nnunet_transfer.nnunet_io import build_network
from nnunet_transfer.plans.adapt import load_nnssl_encoder
from nnunet_transfer.plans.model_folder import resolve_checkpoint
from nnunet_transfer.policies.lora import (PAYLOAD_FORMAT, adapter_parameter_names, adapter_payload,
                                           apply_adapter_payload, check_rank, inject_lora, load_lora_state,
                                           lora_modules, lora_state, training_form)
from nnunet_transfer.trainers.base import BASE_KEYS, nnUNetTrainerTransferBase
from nnunet_transfer.training.snapshots import START_FILE

LORA_KEYS = BASE_KEYS | frozenset(TransferConfig.keys("lora")) | {"trainable", "freeze_reinit"}
ADAPTER_FILE = "lora_adapters.pth"


def target_convs(model: BlockModel, spec: str) -> list[str]:
    """Canonical names of the convolutions (and linear layers: a Primus' attention and MLP projections) whose kernels
    ``spec`` selects (heads refused), in block order."""
    sel = model.select(spec)
    if sel.seg or any(p.seg for p in sel.parts):
        raise ConfigError(f"setting 'lora_targets'={spec!r} includes the segmentation heads ('seg'/'all'); the heads "
                          f"are new for the target and train in full, so adapters go on encoder/decoder "
                          f"convolutions only: use e.g. 'encoder+decoder' (the default)")
    kernels = model.param_names(spec) & model.kind_names.get("kernel", frozenset())
    if not kernels:
        raise ConfigError(f"setting 'lora_targets'={spec!r} ({sel.describe()}) selects no convolution kernel, so "
                          f"there is nothing to adapt; give blocks or groups with convolutions (e.g. "
                          f"'encoder+decoder', 'decoder', 'blocks:1,2'; ':kernel' is fine, ':norm'/':bias' are not)")
    order = {n: i for i, n in enumerate(model.all_param_names)}
    return [k[: -len(".weight")] for k in sorted(kernels, key=order.__getitem__)]


class nnUNetTrainerLoRA(nnUNetTrainerTransferBase):
    """LoRA fine-tuning: rank-r adapters on every encoder/decoder convolution, base frozen, heads trained."""

    transfer_keys = LORA_KEYS
    #: target convolutions that did not come from the source and so carry no adapter (set in _adapt_network)
    _convs_without_adapter: int = 0

    # ------------------------------------------------------------------ settings (before any folder)
    @classmethod
    def check_network(cls, cfg, network):
        super().check_network(cfg, network)  # every spec selects something
        net = network()
        model = BlockModel.from_network(net)  # the planned (meta) network: no trainer exists yet
        convs = target_convs(model, cfg.lora_targets)
        check_rank(cfg.lora_rank, {n: net.get_submodule(n) for n in convs})
        if cfg.trainable is not None:
            both = model.param_names(cfg.trainable) & {f"{c}.weight" for c in convs}
            if both:
                raise ConfigError(f"setting 'trainable'={cfg.trainable!r} trains {len(both)} kernel(s) that carry "
                                  f"adapters (e.g. {sorted(both)[0]}); a kernel is either adapted or trained in full: "
                                  f"narrow 'trainable' (e.g. 'all:norm') or 'lora_targets'")

    # ------------------------------------------------------------------ build
    def _adapt_network(self, net: nn.Module) -> None:
        # after build and compile, before the DDP wrap (the adapters are new parameters DDP must know)
        cfg = self.transfer_config
        convs = target_convs(self.blocks, cfg.lora_targets)
        # adapters go on transferred convolutions only: one that did not come from the source (re-initialised or
        # new after `weights adapt`) trains in full, unless freeze_reinit keeps it a frozen random base
        fresh = set() if cfg.freeze_reinit else self.not_transferred(net)
        without = [c for c in convs if f"{c}.weight" in fresh]
        self._convs_without_adapter = len(without)
        convs = [c for c in convs if f"{c}.weight" not in fresh]
        if not convs:
            raise TransferError(f"lora_targets={cfg.lora_targets!r}: none of its convolutions came from the "
                                f"pretrained weights (re-initialised or new after `weights adapt`), so no adapter "
                                f"has a pretrained base; target transferred blocks, or use nnUNetTrainerFinetune")
        inject_lora(net, convs, rank=cfg.lora_rank, alpha=cfg.lora_alpha)
        adapters = sum(m.lora_A.numel() + m.lora_B.numel() for m in lora_modules(net).values())
        # "convs" counts every adapted layer (as before Primus); "linear" the linear layers among them
        self.transfer_state["lora"] = {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "convs": len(convs),
                                       "linear": sum(isinstance(net.get_submodule(c), nn.Linear) for c in convs),
                                       "adapter_params": adapters,
                                       "plain_params": sum(p.numel() for p in net.parameters()) - adapters,
                                       "convs_not_transferred": len(without)}

    def _not_transferred_extras(self) -> dict:
        return {"lora_convs_without_adapter": self._convs_without_adapter}

    def _trainable_names(self, net: nn.Module) -> set[str]:
        names = adapter_parameter_names(net)
        if self.transfer_config.trainable is not None:
            names |= self.blocks.param_names(self.transfer_config.trainable)
        return names  # + the segmentation heads (base class)

    def _on_weights_ready(self, pretrained_loaded: bool) -> None:
        if not pretrained_loaded:
            self.print_to_log_file("WARNING nnunet_transfer: nnUNetTrainerLoRA started WITHOUT pretrained weights: "
                                   "the frozen base is the random initialisation")
        lo = self.transfer_state["lora"]
        linear = lo.get("linear", 0)
        layers = (f"{lo['convs']} layers ({linear} linear, {lo['convs'] - linear} convolutions)" if linear
                  else f"{lo['convs']} convolutions")
        self.print_to_log_file(f"nnunet_transfer: LoRA rank {lo['rank']} (alpha {lo['alpha']}) on {layers} of "
                               f"{self.transfer_config.lora_targets!r}: {lo['adapter_params']:,} "
                               f"adapter parameters for {lo['plain_params']:,} in the network")

    def _weights_for_drift(self):
        # the function the network computes moved, not its frozen base: compare the merged kernels
        return unwrap(self.network).state_dict()

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_extras(self) -> dict:
        return {"lora_state": lora_state(self.network)}

    def _restore_checkpoint_extras(self, state: dict) -> None:
        if "lora_state" not in state:
            raise TransferError("this checkpoint holds no LoRA training state (base kernels and adapters); it was not "
                                "written by nnUNetTrainerLoRA and cannot be resumed by it")
        # nnU-Net loaded the merged kernels as the base (B = 0 before this line); the exact W0, A, B follow
        load_lora_state(self.network, state["lora_state"])

    def _checkpoint_load_context(self):
        # nnU-Net's load_checkpoint calls network.state_dict() once per key; in the training form that is
        # free (no merged kernels are computed). Loading a plain file is unaffected by the form.
        return training_form(self.network)

    def _on_training_end(self) -> None:
        path = self.write_adapter_file(os.path.join(self.output_folder, ADAPTER_FILE))
        self.print_to_log_file(f"nnunet_transfer: adapters written to {path} ({os.path.getsize(path):,} bytes); "
                               f"checkpoint_final.pth holds the merged weights")

    def write_adapter_file(self, path: str | os.PathLike) -> Path:
        """Adapters + tensors trained in full + digests of the frozen base, with nnU-Net's metadata."""
        net = unwrap(self.network)
        trained = [n for n, p in net.named_parameters() if p.requires_grad]
        payload = adapter_payload(net, trained_names=trained)
        source = self.transfer_state.get("pretrained_source")
        payload.update({
            "trainer_name": self.__class__.__name__, "init_args": self.my_init_kwargs,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
            "current_epoch": self.current_epoch, "settings": self.transfer_config.to_json_dict(),
            "base_source": source or os.path.join(self.output_folder, START_FILE)})
        return save_atomic(path, payload)


# --------------------------------------------------------------------------- merge (API of `lora merge`)
def read_adapter_file(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"adapter file {path} not found (nnUNetTrainerLoRA writes {ADAPTER_FILE} in the fold folder "
                        f"at the end of training)")
    payload = read_checkpoint(path, what="adapter file")
    if not isinstance(payload, dict) or payload.get("format") != PAYLOAD_FORMAT:
        raise DataError(f"{path} is not an adapter file of nnunet_transfer (expected format {PAYLOAD_FORMAT!r}); "
                        f"give the {ADAPTER_FILE} of a nnUNetTrainerLoRA fold folder")
    return payload


def merged_network(adapter_file: str | os.PathLike, base_file: str | os.PathLike) -> tuple[nn.Module, dict]:
    """The plain network of the adapter file's plans with the base loaded and the adapters applied (unmerged)."""
    payload = read_adapter_file(adapter_file)
    args = payload["init_args"]
    net = build_network(args["plans"], args["configuration"], args["dataset_json"])
    base = load_weights(resolve_checkpoint(base_file))
    if base.is_nnssl:  # the run loaded its encoder and stem as -pretrained_weights does; the rest trained in full
        load_nnssl_encoder(net, base.path)
    else:
        blocking = compare(base.state, net).blocking
        if blocking:
            raise DataError(f"base {base.path} does not fit the network of the adapters' plans "
                            f"({args['configuration']}): " + "; ".join(m.line() for m in blocking[:3]))
        own = net.state_dict()
        net.load_state_dict({**own, **{k: v for k, v in base.state.items() if k in own and v.shape == own[k].shape}})
    apply_adapter_payload(net, payload)  # refuses a base whose frozen tensors differ from the training's
    return net, payload


def merge_adapters(adapter_file: str | os.PathLike, base_file: str | os.PathLike, out: str | os.PathLike, *,
                   force: bool = False) -> Path:
    """Write an nnU-Net checkpoint with base + (α/r)·B·A merged, the trained heads, and the run's metadata.

    The result is what ``checkpoint_final.pth`` of the LoRA run holds: ``nnUNetv2_predict -chk`` reads it in
    a model folder of the run's plans, and ``-pretrained_weights`` accepts it.
    """
    out = Path(out)
    if out.exists() and not force:
        raise DataError(f"{out} exists; pass --force to replace it")
    net, payload = merged_network(adapter_file, base_file)
    checkpoint = {
        "network_weights": {k: v.detach().cpu() for k, v in net.state_dict().items()},  # plain form: merged
        "trainer_name": payload["trainer_name"], "init_args": payload["init_args"],
        "inference_allowed_mirroring_axes": payload["inference_allowed_mirroring_axes"],
        "current_epoch": payload["current_epoch"],
        "nnunet_transfer": {"merged_from": {"adapters": str(adapter_file), "base": str(base_file)},
                            "settings": payload["settings"]},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_atomic(out, checkpoint)


__all__ = ["nnUNetTrainerLoRA", "target_convs", "read_adapter_file", "merged_network", "merge_adapters",
           "ADAPTER_FILE"]
