"""What was not transferred is treated alike by every strategy (in-process, tiny plans, synthetic batches).

A source U-Net with one stage fewer than the target is mapped by ``weights adapt``'s own function
(:func:`adapt_state`); the trainers get the file as ``nnUNetv2_train -pretrained_weights`` gives it (checked in
``__init__``), nnU-Net's loader loads it, and the network is compiled as on a GPU (``_do_i_compile`` forced True;
dynamo's ``eager`` backend: the same ``OptimizedModule`` and ``_orig_mod.`` names without the CPU code generator).
The sets each strategy anchors, freezes and adapts are compared with the adapt report.
"""
from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

import nnunet_transfer.trainers as T
from nnunet_transfer.blocks import BlockModel
from nets import unet
from nnunet_transfer.checkpoints import ADAPTED_KEY
from nnunet_transfer.netutil import kernel_names, unwrap
from nnunet_transfer.plans.adapt import adapt_state
from nnunet_transfer.plans.adapt_report import FROM_SOURCE
from nnunet_transfer.plans.provenance import source_param_names, transfer_record
from nnunet_transfer.checkpoints import load_weights
from nnunet_transfer.policies.lora import lora_modules
from nnunet_transfer.training.pretrained import check_pretrained, planned_network, target_network

from test_peft_trainers import DATASET_JSON, plans_with, steps


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    """``(file, report)``: a 2-stage source adapted to the 3-stage 'run' network (a new bottleneck stage)."""
    path = tmp_path_factory.mktemp("adapted") / "adapted.pth"
    source = unet("plain", 2, seed=1, features=[8, 16], n_conv_decoder=2, num_classes=3)
    torch.manual_seed(0)
    target = target_network(T.nnUNetTrainerTransferBase, plans_with({}), "run", DATASET_JSON)
    state, report = adapt_state(source.state_dict(), target, source_label="source", target_label="run")
    torch.save({"network_weights": state, ADAPTED_KEY: report.to_dict()}, path)
    return path, report.to_dict()


def actions(report, *which):
    return {t["name"] for t in report["tensors"] if t["action"] in which}


@pytest.fixture
def trainer(tmp_path, monkeypatch, adapted):
    """``make(cls, settings)``: a trainer built with ``-pretrained_weights`` = the adapted file, initialised with
    the compiled path, the file loaded by nnU-Net's own loader, and the strategy told (anchor captured)."""
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    for key in ("nnUNet_preprocessed", "nnUNet_results", "nnUNet_raw"):
        monkeypatch.setenv(key, str(tmp_path / key))
    data = tmp_path / "nnUNet_preprocessed" / "Dataset901_TransferSource" / "nnUNetPlans_3d_fullres"
    data.mkdir(parents=True)
    (data / "case.b2nd").touch()  # nnU-Net infers the dataset class from the file endings in initialize()
    monkeypatch.setattr(T.nnUNetTrainerTransferBase, "_do_i_compile", lambda self: True)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))

    def make(cls, settings, *, load=True, init=True):
        plans = plans_with({"seed": 0, **settings})
        tr = cls(plans=plans, configuration="run", fold=0, dataset_json=DATASET_JSON, device=torch.device("cpu"))
        if load:  # what __init__ does with nnUNetv2_train's command line
            tr.pretrained_file = check_pretrained(str(adapted[0]), trainer_class=cls, plans=plans,
                                                  configuration="run", dataset_json=DATASET_JSON)
        if not init:  # --c: load_checkpoint initialises
            return tr
        tr.initialize()
        assert type(tr.network).__name__ == "OptimizedModule"  # the compiled path
        if load:
            load_pretrained_weights(tr.network, str(adapted[0]))
            tr._on_weights_ready(True)
        return tr
    return make


def test_source_param_names_are_what_the_report_lists_as_from_the_source(adapted):
    path, report = adapted
    net = planned_network(T.nnUNetTrainerTransferBase, plans_with({}), "run", DATASET_JSON)
    weights = load_weights(path)
    record = transfer_record(weights, net, loaded_keys=0)
    assert source_param_names(record, net) == actions(report, *FROM_SOURCE)
    assert actions(report, "new") and actions(report, "copied")  # the new stage, and what came from the source
    heads = actions(report, "head")
    assert source_param_names(record, net, heads_transferred=True) == actions(report, *FROM_SOURCE) | heads
    plain = transfer_record(dataclasses.replace(weights, adapted=None), net, loaded_keys=0)
    assert source_param_names(plain, net) == {n for n, _ in net.named_parameters()} - heads  # same-plans load
    assert source_param_names(None, net) is None


@pytest.mark.parametrize("cls", [T.nnUNetTrainerL2SP_Li, T.nnUNetTrainerL2SP])
def test_l2sp_anchors_exactly_the_transferred_tensors(trainer, adapted, cls):
    _, report = adapted
    tr = trainer(cls, {})
    net = unwrap(tr.network)
    params = dict(net.named_parameters())
    fresh = actions(report, "reinit", "not_transferable", "new")
    scope = tr._scope(BlockModel.from_network(net))
    want = actions(report, "copied", "mapped") & scope
    if cls is T.nnUNetTrainerL2SP_Li:
        want &= kernel_names(net)
    assert set(tr.l2sp.anchored_names) == want and want
    assert fresh & scope and not fresh & set(tr.l2sp.anchored_names)
    assert fresh <= set(tr.l2sp.new_names)  # the beta group: L2 toward zero (Li et al.'s w_S-bar)
    assert all(params[n].requires_grad for n in fresh)
    nt = tr.transfer_state["not_transferred"]
    assert nt["tensors"] == len(fresh) and nt["parameters"] == sum(params[n].numel() for n in fresh)
    assert nt["l2sp_beta"] == nt["parameters"]
    assert nt["l2sp_not_anchored"] == sum(params[n].numel() for n in fresh & scope)
    assert "are in its beta group" in tr._not_transferred_text()
    anchor = {n: params[n].detach().clone() for n in tr.l2sp.anchored_names}
    steps(tr, 2)  # through the compiled network and the penalised step
    assert all(not torch.equal(params[n], anchor[n]) for n in anchor if ".conv." in n)
    assert tr.l2sp.penalty_value() > 0


def test_l2sp_without_pretrained_weights_still_anchors_the_random_scope(trainer):
    tr = trainer(T.nnUNetTrainerL2SP_Li, {"allow_random_anchor": True}, load=False)
    net = unwrap(tr.network)
    scope = tr._scope(BlockModel.from_network(net))
    assert set(tr.l2sp.anchored_names) == scope & kernel_names(net)
    assert tr.transfer_state["not_transferred"]["tensors"] == 0


@pytest.mark.parametrize("cls, spec_part", [(T.nnUNetTrainerNormOnly, ".norm."), (T.nnUNetTrainerBitFit, ".bias"),
                                            (T.nnUNetTrainerLoRA, ".lora_")])
def test_peft_trainers_train_the_new_stage_in_full(trainer, adapted, cls, spec_part):
    _, report = adapted
    tr = trainer(cls, {"lora_rank": 2} if cls is T.nnUNetTrainerLoRA else {})
    net = unwrap(tr.network)
    params = dict(net.named_parameters())
    fresh = actions(report, "reinit", "not_transferable", "new")
    source = actions(report, *FROM_SOURCE)
    trainable = {n for n, p in params.items() if p.requires_grad}
    by_spec = {n for n in params if spec_part in n or ".seg_layers." in n}
    assert trainable == by_spec | fresh and fresh - by_spec  # the new stage trains in full, on top of the spec
    if cls is T.nnUNetTrainerLoRA:
        transferred_convs = {n[:-len(".weight")] for n in source & kernel_names(net)}
        assert set(lora_modules(net)) == transferred_convs  # adapters only on convolutions from the source
        assert tr.transfer_state["not_transferred"]["lora_convs_without_adapter"] == \
            len({n for n in fresh if n.endswith(".weight") and n in kernel_names(net)})
    nt = tr.transfer_state["not_transferred"]
    assert nt["trained_in_full_by_rule"] == sum(params[n].numel() for n in fresh - by_spec) > 0
    start = {n: p.detach().clone() for n, p in params.items()}
    steps(tr, 2)  # through the compiled network
    kernels = kernel_names(net)
    assert all(not torch.equal(params[n], start[n]) for n in fresh & kernels)  # trained
    assert all(torch.equal(params[n], start[n]) for n in (source & kernels) - by_spec)  # frozen base


def test_freeze_reinit_keeps_the_strategies_freezing(trainer, adapted):
    _, report = adapted
    fresh = actions(report, "reinit", "not_transferable", "new")
    for cls, extra in ((T.nnUNetTrainerNormOnly, {}), (T.nnUNetTrainerLoRA, {"lora_rank": 2})):
        tr = trainer(cls, {"freeze_reinit": True, **extra})
        net = unwrap(tr.network)
        frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
        assert fresh & kernel_names(net) <= frozen
        assert tr.transfer_state["not_transferred"]["frozen_by_freeze_reinit"] > 0
    assert {f"{n}.weight" for n in lora_modules(net)} == kernel_names(net) - actions(report, "head")


def test_a_stage_never_freezes_what_was_not_transferred(trainer, adapted):
    _, report = adapted
    tr = trainer(T.nnUNetTrainerStaged_headsFirst, {})
    trainable = {n for n, p in unwrap(tr.network).named_parameters() if p.requires_grad}
    assert trainable == actions(report, "head", "reinit", "not_transferable", "new")


def test_lora_resume_restores_the_same_adapters_without_the_file(trainer, adapted, tmp_path):
    tr = trainer(T.nnUNetTrainerLoRA, {"lora_rank": 2})
    steps(tr, 1)
    # what on_train_start records after the load (the adapt record travels in every checkpoint)
    tr.transfer_state.update(pretrained_loaded=True, transfer=tr.pretrained_file.transfer)
    path = str(tmp_path / "ckpt.pth")
    tr.save_checkpoint(path)
    again = trainer(T.nnUNetTrainerLoRA, {"lora_rank": 2}, load=False, init=False)  # --c: no -pretrained_weights
    again.load_checkpoint(path)
    assert type(again.network).__name__ == "OptimizedModule"
    assert set(lora_modules(unwrap(again.network))) == set(lora_modules(unwrap(tr.network)))
    assert again.transfer_state["parameters"] == tr.transfer_state["parameters"]
    assert {n for n, p in unwrap(again.network).named_parameters() if p.requires_grad} == \
        {n for n, p in unwrap(tr.network).named_parameters() if p.requires_grad}
