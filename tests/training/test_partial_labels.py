"""The marginal loss (partial labels) and the distillation term, against independent computations on hand-built
tensors: values and gradients (autograd of the independent formula)."""
from __future__ import annotations

import pytest
import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from nnunet_transfer.config import TransferConfig, parse_cli_value
from nnunet_transfer.errors import ConfigError
from nnunet_transfer.training.distill import DistillationLoss, class_match, distillation_kl
from nnunet_transfer.training.partial_labels import MarginalLoss, declared_unannotated, resolve_unannotated

SMOOTH = 1e-5
#: nnU-Net's soft Dice sums in float32 (``sum(..., dtype=torch.float32)``) whatever the input dtype; the
#: independent computation sums in float64: they agree to float32 precision, not bit for bit
TOL = 1e-6
TARGET_JSON = {"labels": {"background": 0, "organ": 1, "lesion": 2, "cyst": 3}}
SOURCE_LABELS = {"background": 0, "organ": 1, "lesion": 2}


def nnunet_loss(batch_dice: bool) -> DC_and_CE_loss:
    """What nnUNetTrainer._build_loss builds for label-based training (no ignore label)."""
    return DC_and_CE_loss({"batch_dice": batch_dice, "smooth": SMOOTH, "do_bg": False, "ddp": False}, {},
                          weight_ce=1, weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)


def independent(logits: torch.Tensor, target: torch.Tensor, merged: list[int], batch_dice: bool) -> torch.Tensor:
    """CE + soft Dice of nnU-Net written out by hand on the marginal probabilities p(merged) = Σ p_c."""
    p = torch.softmax(logits, 1)
    kept = [c for c in range(logits.shape[1]) if c not in merged]
    q = torch.stack([sum(p[:, c] for c in merged), *[p[:, c] for c in kept]], 1)  # (b, K, ...)
    renumber = {**{c: 0 for c in merged}, **{c: i for i, c in enumerate(kept, 1)}}
    t = target[:, 0].clone()
    for old, new in renumber.items():
        t[target[:, 0] == old] = new
    t = t.long()
    ce = -torch.log(torch.gather(q, 1, t[:, None])).mean()
    onehot = torch.stack([(t == k).to(q.dtype) for k in range(q.shape[1])], 1)
    axes = tuple(range(2, q.ndim))
    inter = (q * onehot)[:, 1:].sum(axes)
    pred, gt = q[:, 1:].sum(axes), onehot[:, 1:].sum(axes)
    if batch_dice:
        inter, pred, gt = inter.sum(0), pred.sum(0), gt.sum(0)
    dice = ((2 * inter + SMOOTH) / (gt + pred + SMOOTH)).mean()
    return ce - dice


def case(seed: int, shape=(2, 4, 5, 6, 3)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, generator=g, dtype=torch.float64) * 2
    # the target never holds the unannotated classes 1, 2 (they are labelled background)
    target = torch.randint(0, 2, (shape[0], 1, *shape[2:]), generator=g).double() * 3
    return logits, target


@pytest.mark.parametrize("batch_dice", [True, False])
def test_marginal_loss_value_and_gradient_equal_the_independent_computation(batch_dice):
    logits, target = case(0)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    ours = MarginalLoss(nnunet_loss(batch_dice), 4, [1, 2])(a, target)
    ref = independent(b, target, [0, 1, 2], batch_dice)
    ours.backward()
    ref.backward()
    assert torch.allclose(ours, ref, rtol=0, atol=TOL), (ours.item(), ref.item())
    assert torch.allclose(a.grad, b.grad, rtol=0, atol=TOL)
    # merging changes the loss: the plain loss pushes the unannotated classes' probability to zero
    plain = nnunet_loss(batch_dice)(logits, target)
    assert abs(plain.item() - ours.item()) > 1e-3


def test_marginal_loss_with_deep_supervision_weights_each_resolution():
    weights = [4 / 7, 2 / 7, 1 / 7]
    outputs, targets = zip(*[case(s, (2, 4, 8 // 2 ** i, 8 // 2 ** i, 4)) for s, i in zip((1, 2, 3), range(3))])
    a = [o.clone().requires_grad_(True) for o in outputs]
    b = [o.clone().requires_grad_(True) for o in outputs]
    ours = MarginalLoss(DeepSupervisionWrapper(nnunet_loss(True), weights), 4, [1, 2])(a, list(targets))
    ref = sum(w * independent(o, t, [0, 1, 2], True) for w, o, t in zip(weights, b, targets))
    ours.backward()
    ref.backward()
    assert torch.allclose(ours, ref, rtol=0, atol=TOL)
    for x, y in zip(a, b):
        assert torch.allclose(x.grad, y.grad, rtol=0, atol=TOL)


def test_marginal_loss_renumbers_annotated_classes_between_merged_ones():
    # merged {0, 2}: label 1 stays channel 1, label 3 becomes channel 2
    logits, _ = case(4)
    g = torch.Generator().manual_seed(5)
    target = torch.tensor([0.0, 1.0, 3.0])[torch.randint(0, 3, (2, 1, 5, 6, 3), generator=g)]
    ours = MarginalLoss(nnunet_loss(True), 4, [2])(logits, target)
    assert torch.allclose(ours, independent(logits, target, [0, 2], True), rtol=0, atol=TOL)


def independent_kl(student, teacher, target, *, t_bg, t_kept, s_bg, s_kept):
    """KL(p_T || p_S) per voxel by hand (probabilities summed, then logs), averaged over the background voxels."""
    pt, ps = torch.softmax(teacher, 1), torch.softmax(student, 1)
    pt = torch.stack([sum(pt[:, c] for c in t_bg), *[pt[:, c] for c in t_kept]], 1)
    ps = torch.stack([sum(ps[:, c] for c in s_bg), *[ps[:, c] for c in s_kept]], 1)
    kl = (pt * (torch.log(pt) - torch.log(ps))).sum(1)
    mask = (target[:, 0] == 0).double()
    return (kl * mask).sum() / mask.sum()


def test_distillation_kl_value_and_gradient_equal_the_independent_computation():
    g = torch.Generator().manual_seed(6)
    teacher = torch.randn(2, 3, 4, 5, 3, generator=g, dtype=torch.float64)
    student, target = case(7, (2, 4, 4, 5, 3))
    match = class_match({"labels": SOURCE_LABELS}, TARGET_JSON)
    assert match == ([0], [1, 2], [0, 3], [1, 2])  # the new class 3 is background to the teacher
    a = student.clone().requires_grad_(True)
    b = student.clone().requires_grad_(True)
    seg = nnunet_loss(True)
    loss = DistillationLoss(seg, weight=0.7)
    loss.match = match
    loss.teacher_logits = teacher
    ours = loss(a, target)
    ref = seg(b, target) + 0.7 * independent_kl(b, teacher, target, t_bg=[0], t_kept=[1, 2], s_bg=[0, 3],
                                                s_kept=[1, 2])
    ours.backward()
    ref.backward()
    assert torch.allclose(ours, ref, rtol=0, atol=TOL)
    assert torch.allclose(a.grad, b.grad, rtol=0, atol=TOL)
    assert loss.teacher_logits is None  # taken once: a validation step gets the segmentation loss alone
    assert torch.equal(loss(student, target), seg(student, target))


def test_distillation_kl_is_zero_when_the_student_agrees_with_the_teacher():
    g = torch.Generator().manual_seed(8)
    teacher = torch.randn(1, 3, 4, 4, 4, generator=g, dtype=torch.float64)
    student = torch.cat([teacher, torch.full_like(teacher[:, :1], -1e4)], 1)  # class 3 never predicted
    mask = torch.ones(1, 4, 4, 4, dtype=torch.bool)
    assert distillation_kl(student, teacher, mask, ([0], [1, 2], [0, 3], [1, 2])).abs().item() < 1e-12


def test_unannotated_is_read_from_the_setting_or_dataset_json_and_checked():
    assert declared_unannotated(None, {**TARGET_JSON, "unannotated": ["organ"]}) == (["organ"],
                                                                                      "dataset.json 'unannotated'")
    assert declared_unannotated([], {**TARGET_JSON, "unannotated": ["organ"]})[0] == []  # [] overrides: none
    assert resolve_unannotated(["organ", "lesion"], "s", TARGET_JSON, SOURCE_LABELS) == {"organ": 1, "lesion": 2}
    with pytest.raises(ConfigError, match="'cyst'.*unknown to the source"):
        resolve_unannotated(["cyst"], "s", TARGET_JSON, SOURCE_LABELS)
    with pytest.raises(ConfigError, match="'liver' is not a label of the target"):
        resolve_unannotated(["liver"], "s", TARGET_JSON, SOURCE_LABELS)
    with pytest.raises(ConfigError, match="regions"):
        resolve_unannotated(["organ"], "s", {"labels": {"background": 0, "organ": [1, 2], "lesion": 2}})
    with pytest.raises(ConfigError, match="every foreground class"):
        resolve_unannotated(["organ", "lesion", "cyst"], "s", TARGET_JSON)
    assert parse_cli_value("unannotated", "organ, lesion") == ["organ", "lesion"]
    assert TransferConfig.from_mapping({"unannotated": "organ,lesion"}).unannotated == ["organ", "lesion"]
    with pytest.raises(ConfigError, match="distill_weight"):
        TransferConfig(distill_weight=-1.0)
