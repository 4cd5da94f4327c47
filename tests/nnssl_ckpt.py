"""Tiny nnssl checkpoints, written the way nnssl writes them (no download).

nnssl's ``AbstractBaseTrainer.save_checkpoint`` (src/nnssl/training/nnsslTrainer/AbstractTrainer.py) saves
``network_weights`` (the whole pretraining network), ``optimizer_state``, ``grad_scaler_state``, ``logging``,
``_best_ema``, ``current_epoch``, ``init_args``, ``trainer_name`` and ``nnssl_adaptation_plan`` =
``AdaptationPlan.serialize()`` (src/nnssl/adaptation_planning/adaptation_plan.py); its pretraining network is
built by ``get_network_from_plans`` with ``deep_supervision=False`` and one reconstruction output channel, as
BaseMAETrainer / var_arch_size do. nnU-Net 2.8.1's ``get_network_from_plans`` is the same function.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

CONV3D = "torch.nn.modules.conv.Conv3d"


def resenc_kwargs(features=(8, 16, 32), *, blocks=None) -> dict:
    """``DynamicArchitecturePlans(...).serialize()`` of a small ResidualEncoderUNet (3-D, stride 2 after the stem)."""
    n = len(features)
    return {"n_stages": n, "features_per_stage": list(features), "conv_op": CONV3D,
            "kernel_sizes": [[3, 3, 3]] * n, "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
            "n_blocks_per_stage": list(blocks or [1] + [2] * (n - 1)), "n_conv_per_stage_decoder": [1] * (n - 1),
            "conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
            "nonlin": "torch.nn.modules.activation.LeakyReLU", "nonlin_kwargs": {"inplace": True}}


def adaptation_plan(kwargs: dict | None, *, arch_class_name: str = "ResidualEncoderUNet", channels: int = 1,
                    patch=(32, 32, 32)) -> dict:
    """``AdaptationPlan.serialize()`` as nnssl writes it for a ResEnc pretraining (BaseMAETrainer's keys)."""
    config = {"data_identifier": "nnsslPlans_onemmiso", "preprocessor_name": "DefaultPreprocessor",
              "spacing_style": "onemmiso", "normalization_schemes": ["ZScoreNormalization"],
              "use_mask_for_norm": False, "resampling_fn_data": "resample_data_or_seg_to_shape",
              "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
              "resampling_fn_mask": "resample_data_or_seg_to_shape",
              "resampling_fn_mask_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
              "spacing": [1, 1, 1], "patch_size": list(patch)}
    requiring_import = ["conv_op", "norm_op", "nonlin"] if kwargs else None
    return {"architecture_plans": {"arch_class_name": arch_class_name, "arch_kwargs": copy.deepcopy(kwargs),
                                   "arch_kwargs_requiring_import": requiring_import},
            "pretrain_plan": {"dataset_name": "Dataset745_OpenMind", "plans_name": "nnsslPlans",
                              "original_median_spacing_after_transp": [1, 1, 1],
                              "image_reader_writer": "NibabelReaderWriter", "transpose_forward": [0, 1, 2],
                              "transpose_backward": [0, 1, 2], "configurations": {"onemmiso": config},
                              "experiment_planner_used": "ExperimentPlanner"},
            "pretrain_num_input_channels": channels, "recommended_downstream_patchsize": list(patch),
            "key_to_encoder": "encoder.stages", "key_to_stem": "encoder.stem",
            "keys_to_in_proj": ("encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"),
            "key_to_lpe": None}


def pretraining_network(kwargs: dict, *, channels: int = 1, seed: int = 0):
    """The network nnssl pretrains: all of the U-Net, one reconstruction output channel, no deep supervision."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    torch.manual_seed(seed)
    net = get_network_from_plans("dynamic_network_architectures.architectures.unet.ResidualEncoderUNet", kwargs,
                                 ["conv_op", "norm_op", "nonlin"], channels, 1, allow_init=True,
                                 deep_supervision=False)
    # pretrained weights are not an initialisation: move every tensor away from nnU-Net's init, so that a
    # tensor left at the target's own init can never equal the checkpoint's by chance
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return net


def write_nnssl_checkpoint(path: Path, *, features=(8, 16, 32), channels: int = 1, patch=(32, 32, 32),
                           seed: int = 0, plan: dict | None = None) -> tuple[Path, dict[str, torch.Tensor], dict]:
    """Write an nnssl checkpoint of a small ResidualEncoderUNet; returns its path, its network_weights and its plan."""
    kwargs = resenc_kwargs(features)
    net = pretraining_network(kwargs, channels=channels, seed=seed)
    plan = plan if plan is not None else adaptation_plan(kwargs, channels=channels, patch=patch)
    state = net.state_dict()
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    checkpoint = {"network_weights": state, "optimizer_state": optimizer.state_dict(), "grad_scaler_state": None,
                  "logging": {"train_losses": [0.9, 0.5], "val_losses": [0.8, 0.6], "lrs": [1e-2, 9e-3]},
                  "_best_ema": 0.6, "current_epoch": 2,
                  "init_args": {"plan": plan["pretrain_plan"], "configuration_name": "onemmiso", "fold": 0,
                                "pretrain_json": {"name": "OpenMind"}, "device": torch.device("cpu")},
                  "trainer_name": "BaseMAETrainer", "nnssl_adaptation_plan": plan}
    torch.save(checkpoint, path)
    return path, {k: v.detach().clone() for k, v in state.items()}, plan


# --------------------------------------------------------------------------- Primus (nnssl's EvaMAE)
PRIMUS_KEYS = {"key_to_encoder": "eva", "key_to_stem": "down_projection", "keys_to_in_proj": ("down_projection.proj",),
               "key_to_lpe": "eva.pos_embed"}


class EvaMAE(torch.nn.Module):
    """nnssl's ``EvaMAE`` (src/nnssl/architectures/evaMAE_module.py) as its ``__init__`` builds it from
    dynamic-network-architectures' blocks — the same modules under the same names, so its ``state_dict`` has
    nnssl's keys: ``down_projection`` (PatchEmbed), ``eva`` (the encoder), ``up_projection`` (PatchDecode),
    ``decoder`` (a second Eva) and ``mask_token``. (nnssl itself is not installed; only the forward pass, which
    masks tokens, is left out.)"""

    def __init__(self, input_channels: int, embed_dim: int, patch_embed_size, output_channels: int,
                 encoder_eva_depth: int, encoder_eva_numheads: int, decoder_eva_depth: int, decoder_eva_numheads: int,
                 input_shape, num_register_tokens: int = 0, init_values=None, scale_attn_inner: bool = False):
        super().__init__()
        from dynamic_network_architectures.building_blocks.eva import Eva
        from dynamic_network_architectures.building_blocks.patch_encode_decode import (LayerNormNd, PatchDecode,
                                                                                         PatchEmbed)
        from dynamic_network_architectures.initialization.weight_init import InitWeights_He

        grid = tuple(i // ds for i, ds in zip(input_shape, patch_embed_size))
        common = dict(embed_dim=embed_dim, ref_feat_shape=grid, num_reg_tokens=num_register_tokens,
                      use_rot_pos_emb=True, use_abs_pos_emb=True, mlp_ratio=4 * 2 / 3, init_values=init_values,
                      scale_attn_inner=scale_attn_inner)
        self.down_projection = PatchEmbed(patch_embed_size, input_channels, embed_dim)
        self.eva = Eva(depth=encoder_eva_depth, num_heads=encoder_eva_numheads, **common)
        self.up_projection = PatchDecode(patch_embed_size, embed_dim, output_channels, norm=LayerNormNd,
                                         activation=torch.nn.GELU)
        self.decoder = Eva(depth=decoder_eva_depth, num_heads=decoder_eva_numheads, **common)
        self.mask_token = torch.nn.Parameter(torch.zeros(1, 1, embed_dim))
        torch.nn.init.normal_(self.mask_token, std=1e-6)
        self.down_projection.apply(InitWeights_He(1e-2))


def primus_adaptation_plan(*, arch_class_name: str = "Primus", arch_kwargs: dict | None = None, channels: int = 1,
                           patch=(32, 32, 32), recommended=None) -> dict:
    """``AdaptationPlan.serialize()`` as nnssl's Eva trainers write it (``ArchitecturePlans("PrimusM")`` and the
    four Primus keys); ``arch_class_name="Primus"`` with ``arch_kwargs`` is the class with its kwargs."""
    plan = adaptation_plan(None, arch_class_name=arch_class_name, channels=channels, patch=patch)
    plan["architecture_plans"]["arch_kwargs"] = copy.deepcopy(arch_kwargs)
    plan["recommended_downstream_patchsize"] = list(recommended or patch)
    plan.update(PRIMUS_KEYS)
    return plan


#: a tiny Primus for tests: the class with its kwargs (the presets are hundreds of MB)
TINY_PRIMUS = {"embed_dim": 48, "patch_embed_size": [8, 8, 8], "eva_depth": 4, "eva_numheads": 2}


def write_nnssl_primus_checkpoint(path: Path, *, arch_class_name: str = "Primus", arch_kwargs: dict | None = None,
                                  channels: int = 1, patch=(32, 32, 32), recommended=None, seed: int = 0,
                                  ) -> tuple[Path, dict[str, torch.Tensor], dict]:
    """Write an nnssl checkpoint of an EvaMAE pretraining (``arch_kwargs`` default :data:`TINY_PRIMUS`, or a
    preset's sizes when ``arch_class_name`` names one); returns its path, its network_weights and its plan."""
    kw = dict(TINY_PRIMUS if arch_kwargs is None else arch_kwargs)
    torch.manual_seed(seed)
    net = EvaMAE(channels, kw["embed_dim"], tuple(kw["patch_embed_size"]), 1, kw["eva_depth"], kw["eva_numheads"],
                 2, kw["eva_numheads"], tuple(patch), init_values=kw.get("init_values"),
                 scale_attn_inner=kw.get("scale_attn_inner", False))
    with torch.no_grad():  # away from any initialisation, as in pretraining_network
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    plan = primus_adaptation_plan(arch_class_name=arch_class_name,
                                  arch_kwargs=kw if arch_class_name == "Primus" else None, channels=channels,
                                  patch=patch, recommended=recommended)
    state = net.state_dict()
    checkpoint = {"network_weights": state, "optimizer_state": None, "grad_scaler_state": None,
                  "logging": {"train_losses": [0.9]}, "_best_ema": None, "current_epoch": 1,
                  "init_args": {"plan": plan["pretrain_plan"], "configuration_name": "onemmiso", "fold": 0,
                                "pretrain_json": {"name": "OpenMind"}, "device": torch.device("cpu")},
                  "trainer_name": "BaseEvaMAETrainer", "nnssl_adaptation_plan": plan}
    torch.save(checkpoint, path)
    return path, {k: v.detach().clone() for k, v in state.items()}, plan
