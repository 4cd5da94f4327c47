"""L2-SP policy: the update with the policy's penalty gradient equals the update autograd computes on
loss + α‖θ_S − θ̄_S‖² + β‖θ_N‖² (float64, SGD momentum 0.99 nesterov, clipping active or not, grad
scaler or not); α = 0 is plain nnU-Net SGD bit for bit; values, anchor round trip and errors."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from nets import unet
from nnunet_transfer.errors import ConfigError
from nnunet_transfer.policies.l2sp import (
    GROUP_ANCHORED,
    GROUP_BETA,
    GROUP_OTHER,
    AnchorError,
    L2SPPenalty,
    param_groups,
)
from nnunet_transfer.nnunet_compat import penalised_step

LR, WD, MOMENTUM = 1e-2, 3e-5, 0.99
N_STEPS = 4


def tiny_unet(dtype=torch.float64) -> PlainConvUNet:
    return unet("plain", 3, seed=0, n_conv=1, features=[2, 4, 8], deep_supervision=False).to(dtype)


def batches(n: int, dtype=torch.float64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(2, 1, 8, 8, 8, generator=g, dtype=dtype), torch.randint(0, 2, (2, 8, 8, 8), generator=g))
            for _ in range(n)]


def loss_fn(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(net(x), y)


def is_scope(name: str) -> bool:
    return name.startswith("encoder.")


def is_beta(name: str) -> bool:
    return ".seg_layers." in name


def drift(net: nn.Module, seed: int = 2) -> None:
    """Move the weights away from the anchor (as fine-tuning would), so the penalty acts from step 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def policy_for(net: nn.Module, alpha: float, beta: float | None) -> L2SPPenalty:
    named = list(net.named_parameters())
    return L2SPPenalty([(n, p) for n, p in named if is_scope(n)], alpha=alpha, beta=beta,
                       new=[(n, p) for n, p in named if is_beta(n)])


def sgd(groups) -> torch.optim.SGD:
    return torch.optim.SGD(groups, LR, weight_decay=WD, momentum=MOMENTUM, nesterov=True)


def run_policy(alpha, beta, max_norm, scaler=False):
    net = tiny_unet()
    penalty = policy_for(net, alpha, beta)
    penalty.capture()
    drift(net)
    opt = sgd(param_groups(net.parameters(), penalty, weight_decay=WD))
    grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) if scaler else None
    norms = []
    for x, y in batches(N_STEPS):
        opt.zero_grad(set_to_none=True)
        norms.append(float(penalised_step(loss_fn(net, x, y), optimizer=opt, parameters=net.parameters(),
                                          penalty=penalty, grad_scaler=grad_scaler, max_norm=max_norm)))
    return net, norms


def run_autograd(alpha, beta, max_norm):
    """Independent reference: the penalty is part of the loss; groups are built by hand."""
    net = tiny_unet()
    named = list(net.named_parameters())
    anchor = {n: p.detach().clone() for n, p in named}
    drift(net)
    scope = [p for n, p in named if is_scope(n)]
    new = [p for n, p in named if is_beta(n)]
    rest = [p for n, p in named if not is_scope(n) and not is_beta(n)]
    opt = sgd([{"params": scope, "weight_decay": 0.0 if alpha else WD},
               {"params": new, "weight_decay": WD if beta is None else 0.0},
               {"params": rest, "weight_decay": WD}])
    norms = []
    for x, y in batches(N_STEPS):
        opt.zero_grad(set_to_none=True)
        cost = loss_fn(net, x, y)
        cost = cost + alpha * sum(((p - anchor[n]) ** 2).sum() for n, p in named if is_scope(n))
        if beta is not None:
            cost = cost + beta * sum((p ** 2).sum() for n, p in named if is_beta(n))
        cost.backward()
        norms.append(float(nn.utils.clip_grad_norm_(net.parameters(), max_norm)))
        opt.step()
    return net, norms


# alpha, beta, max_norm (1e-3 always clips, 1e6 never does), grad scaler
CASES = [
    pytest.param(0.5, None, 1e6, False, id="alpha-no_clip"),
    pytest.param(0.5, None, 1e-3, False, id="alpha-clip"),
    pytest.param(2.0, 0.1, 1e6, False, id="alpha_beta-no_clip"),
    pytest.param(2.0, 0.1, 1e-3, False, id="alpha_beta-clip"),
    pytest.param(0.5, 0.0, 1e-3, False, id="beta_zero-clip"),
    pytest.param(0.5, 0.1, 1e-3, True, id="alpha_beta-clip-grad_scaler"),
    pytest.param(0.5, None, 1e6, True, id="alpha-no_clip-grad_scaler"),
]


@pytest.mark.parametrize("alpha, beta, max_norm, scaler", CASES)
def test_update_equals_autograd_of_loss_plus_penalty(alpha, beta, max_norm, scaler):
    ours, our_norms = run_policy(alpha, beta, max_norm, scaler)
    ref, ref_norms = run_autograd(alpha, beta, max_norm)
    if max_norm < 1:
        assert min(ref_norms) > max_norm, f"clipping was meant to be active: {ref_norms=}"
    else:
        assert max(ref_norms) < max_norm, f"clipping was meant to be inactive: {ref_norms=}"
    assert our_norms == pytest.approx(ref_norms, rel=1e-10)
    ref_params = dict(ref.named_parameters())
    start = dict(tiny_unet().named_parameters())
    for name, p in ours.named_parameters():
        r = ref_params[name]
        assert not torch.equal(r, start[name]), f"{name} did not move; the test would prove nothing"
        err = (p - r).abs().max() / r.abs().max()
        assert err <= 1e-10, f"{name}: relative deviation {float(err):.3e} from autograd"


def test_alpha_zero_is_plain_nnunet_sgd_bit_for_bit():
    ours, _ = run_policy(0.0, None, 12.0)
    net = tiny_unet()
    drift(net)
    opt = sgd(net.parameters())  # nnU-Net's configure_optimizers: one group, weight decay everywhere
    for x, y in batches(N_STEPS):
        opt.zero_grad(set_to_none=True)
        loss_fn(net, x, y).backward()
        nn.utils.clip_grad_norm_(net.parameters(), 12)
        opt.step()
    mine = dict(ours.named_parameters())
    differ = [n for n, p in net.named_parameters() if not torch.equal(p, mine[n])]
    assert not differ, f"alpha=0 changed the update of {differ}"


def test_param_groups_weight_decay():
    net = tiny_unet()
    names = {id(p): n for n, p in net.named_parameters()}
    for alpha, beta, expected in [(1.0, None, {GROUP_ANCHORED: 0.0, GROUP_BETA: WD, GROUP_OTHER: WD}),
                                  (1.0, 0.0, {GROUP_ANCHORED: 0.0, GROUP_BETA: 0.0, GROUP_OTHER: WD}),
                                  (0.0, 0.1, {GROUP_ANCHORED: WD, GROUP_BETA: 0.0, GROUP_OTHER: WD})]:
        groups = param_groups(net.parameters(), policy_for(net, alpha, beta), weight_decay=WD)
        assert {g["name"]: g["weight_decay"] for g in groups} == expected
        members = {g["name"]: {names[id(p)] for p in g["params"]} for g in groups}
        assert members[GROUP_ANCHORED] == {n for n in names.values() if is_scope(n)}
        assert members[GROUP_BETA] == {n for n in names.values() if is_beta(n)}
        assert sum(len(g["params"]) for g in groups) == len(names)
    frozen_scope = [p for n, p in net.named_parameters() if not is_scope(n)]
    with pytest.raises(ConfigError, match=r"missing from the optimizer's parameters: \['encoder\."):
        param_groups(frozen_scope, policy_for(net, 1.0, None), weight_decay=WD)


def test_penalty_value_and_distance_equal_independent_computation():
    net = tiny_unet()
    penalty = policy_for(net, 0.7, 0.3)
    penalty.capture()
    anchor = {n: p.detach().clone() for n, p in net.named_parameters()}
    drift(net)
    named = {n: p.detach() for n, p in net.named_parameters()}
    sq = {n: float(((named[n] - anchor[n]) ** 2).sum()) for n in named if is_scope(n)}
    expected = 0.7 * sum(sq.values()) + 0.3 * sum(float((p ** 2).sum()) for n, p in named.items() if is_beta(n))
    assert penalty.penalty_value() == pytest.approx(expected, rel=1e-12)
    assert penalty.add_to_grads(return_value=True) == pytest.approx(expected, rel=1e-12)

    ref = {n: math.sqrt(float((anchor[n] ** 2).sum())) for n in sq}
    per_tensor = [math.sqrt(sq[n]) / ref[n] for n in sq if ref[n] > 0]
    overall = math.sqrt(sum(sq.values())) / math.sqrt(sum(r * r for r in ref.values()))
    d = penalty.relative_distance()
    assert d.per_tensor_mean == pytest.approx(sum(per_tensor) / len(per_tensor), rel=1e-12)
    assert d.overall == pytest.approx(overall, rel=1e-12)


def test_at_the_anchor_everything_is_zero():
    net = tiny_unet(torch.float32)
    penalty = policy_for(net, 1.0, None)
    penalty.capture()
    assert penalty.penalty_value() == 0.0
    assert penalty.relative_distance() == (0.0, 0.0)


def test_add_to_grads_builds_no_graph_and_fills_missing_grads():
    net = tiny_unet()
    penalty = policy_for(net, 0.5, 0.2)
    penalty.capture()
    anchor = penalty.state_dict()
    drift(net)
    named = dict(net.named_parameters())
    some = next(n for n in named if is_scope(n))
    for n, p in named.items():  # one anchored tensor has no loss gradient; the others have ones
        p.grad = None if n == some else torch.ones_like(p)
    penalty.add_to_grads()
    for n, p in named.items():
        assert p.grad.grad_fn is None and not p.grad.requires_grad
        base = 0.0 if n == some else 1.0
        if is_scope(n):
            expected = base + 2 * 0.5 * (p.detach() - anchor[n])
        elif is_beta(n):
            expected = base + 2 * 0.2 * p.detach()
        else:
            expected = torch.ones_like(p)
        torch.testing.assert_close(p.grad, expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_state_dict_round_trip_is_bit_identical(dtype):
    net = tiny_unet(dtype)
    penalty = policy_for(net, 1.0, None)
    penalty.capture()
    buf = io.BytesIO()
    torch.save({"l2sp_anchor": penalty.state_dict()}, buf)  # as a trainer stores it in a checkpoint
    state = penalty.state_dict()
    assert list(state) == list(penalty.anchored_names) and list(state) == [n for n, _ in net.named_parameters()
                                                                           if is_scope(n)]
    assert all(t.device.type == "cpu" and t.dtype == dtype and not t.requires_grad for t in state.values())

    resumed = copy.deepcopy(net)
    drift(resumed)  # --c: the network holds fine-tuned weights; the anchor must come from the checkpoint
    restored = policy_for(resumed, 1.0, None)
    buf.seek(0)
    restored.load_state_dict(torch.load(buf, weights_only=True)["l2sp_anchor"])
    again = restored.state_dict()
    assert list(again) == list(state)
    assert all(torch.equal(again[n], state[n]) and again[n].dtype == dtype for n in state)
    # the anchor is a copy: training the network does not move it
    drift(net)
    assert all(torch.equal(t, state[n]) for n, t in penalty.state_dict().items())


def mismatched(state: dict, kind: str) -> dict:
    state = dict(state)
    first = next(iter(state))
    if kind == "missing":
        del state[first]
    elif kind == "unexpected":
        state["decoder.stages.0.extra.weight"] = torch.zeros(1)
    elif kind == "shape":
        state[first] = torch.zeros(3, 3)
    elif kind == "prefixed":  # saved from a compiled network without unwrapping
        state = {f"_orig_mod.{k}": v for k, v in state.items()}
    return state


@pytest.mark.parametrize("kind, match", [
    ("missing", r"missing \(1\): \['encoder\.stages\.0"),
    ("unexpected", r"unexpected \(1\): \['decoder\.stages\.0\.extra\.weight'\]"),
    ("shape", r"shape mismatch \(1\): \['encoder\.stages\.0.*stored \(3, 3\), parameter \(2, 1, 3, 3, 3\)"),
    ("prefixed", r"missing \(\d+\).*unexpected \(\d+\): \['_orig_mod\.encoder"),
])
def test_load_state_dict_reports_mismatches(kind, match):
    net = tiny_unet()
    penalty = policy_for(net, 1.0, None)
    penalty.capture()
    with pytest.raises(AnchorError, match=match):
        policy_for(net, 1.0, None).load_state_dict(mismatched(penalty.state_dict(), kind))


def test_capture_is_explicit_and_once():
    net = tiny_unet()
    penalty = policy_for(net, 1.0, 0.1)
    for use in (penalty.penalty_value, penalty.add_to_grads, penalty.relative_distance, penalty.state_dict):
        with pytest.raises(AnchorError, match="not captured yet: call capture"):
            use()
    penalty.capture()
    first = penalty.state_dict()
    drift(net)
    with pytest.raises(AnchorError, match="already captured.*force=True"):
        penalty.capture()
    assert all(torch.equal(t, first[n]) for n, t in penalty.state_dict().items())
    penalty.capture(force=True)
    assert not torch.equal(penalty.state_dict()[penalty.anchored_names[0]], first[penalty.anchored_names[0]])


@pytest.mark.parametrize("kwargs, match", [
    ({"alpha": -1.0}, r"`alpha` must be a non-negative finite number, got -1.0"),
    ({"alpha": float("nan")}, r"`alpha` must be a non-negative finite number, got nan"),
    ({"alpha": float("inf")}, r"`alpha` = inf means .* freeze it instead"),
    ({"alpha": "1e-3"}, r"`alpha` must be .* got '1e-3' of type str"),
    ({"alpha": True}, r"`alpha` must be .* got True of type bool"),
    ({"alpha": 1.0, "beta": -0.5}, r"`beta` must be a non-negative finite number, got -0.5"),
    ({"alpha": 1.0, "beta": float("nan")}, r"`beta` must be a non-negative finite number, got nan"),
    ({"alpha": 1.0, "beta": float("inf")}, r"`beta` must be finite, got inf"),
])
def test_bad_coefficients(kwargs, match):
    net = tiny_unet()
    with pytest.raises(ConfigError, match=match):
        L2SPPenalty(net.encoder.named_parameters(prefix="encoder"), **kwargs)


def test_bad_parameter_sets():
    net = tiny_unet()
    enc = list(net.encoder.named_parameters(prefix="encoder"))
    with pytest.raises(ConfigError, match="at least one anchored parameter"):
        L2SPPenalty([], alpha=1.0)
    with pytest.raises(ConfigError, match="both anchored and under beta"):
        L2SPPenalty(enc, alpha=1.0, beta=0.1, new=enc[:1])
    with pytest.raises(ConfigError, match=r"are the same tensor \(an alias\)"):
        # dynamic-network-architectures aliases the encoder as decoder.encoder
        L2SPPenalty(list(net.named_parameters(remove_duplicate=False)), alpha=1.0)
    enc[0][1].requires_grad_(False)
    with pytest.raises(ConfigError, match=r"do not require grad \(frozen\): \['encoder\.stages\.0"):
        L2SPPenalty(enc, alpha=1.0)


def test_from_named_parameters_splits_scope_and_leaves_frozen_out():
    net = tiny_unet()
    named = dict(net.named_parameters())
    frozen = "decoder.stages.0.convs.0.conv.weight"
    named[frozen].requires_grad_(False)
    scope = {n for n in named if is_scope(n)}
    penalty = L2SPPenalty.from_named_parameters(named, scope, alpha=1.0, beta=0.1)
    assert set(penalty.anchored_names) == scope
    assert set(penalty.new_names) == set(named) - scope - {frozen}
    with pytest.raises(ConfigError, match=r"scope names not among the network's parameters: \['encoder\.nope'\]"):
        L2SPPenalty.from_named_parameters(named, scope | {"encoder.nope"}, alpha=1.0)
