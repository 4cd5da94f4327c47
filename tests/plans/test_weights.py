"""``weights check`` against nnU-Net's own loader, and ``weights adapt``'s response-preservation laws."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nets import plans_network
from nnunet_transfer.checkpoints import read_checkpoint
from nnunet_transfer.cli.main import main
from nnunet_transfer.errors import ConfigError, DataError
from nnunet_transfer.nnunet_io import build_network
from nnunet_transfer.plans.configure import add_configuration
from nnunet_transfer.plans.weights import (
    adapt_first_conv,
    adapt_weights,
    check_weights,
    find_first_conv,
    load_weights,
)

DATA = Path(__file__).parent.parent / "data"
NAME = "Dataset902_TransferTarget"
FIRST = ["encoder.stages.0.0.convs.0.conv.weight", "decoder.encoder.stages.0.0.convs.0.all_modules.0.weight",
         "decoder.encoder.stages.0.0.convs.0.conv.weight", "encoder.stages.0.0.convs.0.all_modules.0.weight"]


def load_plans() -> dict:
    plans = json.loads((DATA / "nnUNetPlans_3d_32.json").read_text())
    plans = add_configuration(plans, base="3d_fullres", new="tiny", features="4,8,16", patch="16,16,16")
    return add_configuration(plans, base="3d_fullres", new="other", features="8,16", patch="16,16,16")


def dataset_json(channels: int = 1, labels: int = 3) -> dict:
    dj = json.loads((DATA / "dataset_ct2labels.json").read_text())
    dj["channel_names"] = {str(i): "CT" for i in range(channels)}
    dj["labels"] = {"background": 0, **{f"l{i}": i for i in range(1, labels)}}
    return dj


def net(configuration: str = "tiny", channels: int = 1, labels: int = 3, seed: int = 0):
    return plans_network(load_plans(), configuration, dataset_json(channels, labels), seed=seed)


def save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


def nnunet_load(network, path: Path) -> None:
    """nnU-Net's own loader (what -pretrained_weights runs)."""
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    load_pretrained_weights(network, str(path))


def keys_of(report, kind: str, blocking: bool | None = None) -> set[str]:
    return {k for m in report.mismatches if m.kind == kind and (blocking is None or m.blocking == blocking)
            for k in m.keys}


# --------------------------------------------------------------------------- check
def test_same_architecture_loads(tmp_path):
    ckpt = save({"network_weights": net(seed=1).state_dict(), "trainer_name": "nnUNetTrainer"}, tmp_path / "a.pth")
    target = net()
    report = check_weights(load_weights(ckpt), target)
    assert report.loadable and report.mismatches == [] and report.problems == []
    n_seg = sum(".seg_layers." in k for k in target.state_dict())
    assert report.loaded_keys == report.network_keys - n_seg
    assert report.text().splitlines()[0] == f"checkpoint: {ckpt} (nnU-Net checkpoint; trainer_name nnUNetTrainer)"
    assert "OK: -pretrained_weights will load" in report.text()
    nnunet_load(target, ckpt)  # agrees with nnU-Net


def test_other_architecture_lists_every_mismatch_exactly(tmp_path):
    source = net("other").state_dict()
    target = net("tiny").state_dict()
    ckpt = save({"network_weights": source}, tmp_path / "other.pth")
    report = check_weights(load_weights(ckpt), net("tiny"))
    assert not report.loadable
    # the independent computation: nnU-Net's rule over every key of the target state dict
    missing = {k for k in target if k not in source}
    wrong = {k for k in target if k in source and source[k].shape != target[k].shape}
    assert keys_of(report, "missing") == missing
    assert keys_of(report, "shape") == wrong
    assert keys_of(report, "unexpected") == set(source) - set(target)
    assert keys_of(report, "missing", True) == {k for k in missing if ".seg_layers." not in k}
    assert keys_of(report, "shape", True) == {k for k in wrong if ".seg_layers." not in k}
    for m in report.mismatches:
        if m.kind == "shape":
            assert all(list(source[k].shape) == m.checkpoint_shape and list(target[k].shape) == m.network_shape
                       for k in m.keys)
    text = report.text()
    assert "FAIL" in text and "tensor(" not in text
    assert "encoder.stages.0.0.convs.0.conv.weight (+3 aliases): checkpoint (8, 1, 3, 3, 3), network (4, 1, 3, 3, 3)" in text
    with pytest.raises(AssertionError):
        nnunet_load(net("tiny"), ckpt)


def test_other_labels_are_harmless(tmp_path):
    ckpt = save({"network_weights": net(labels=3).state_dict()}, tmp_path / "a.pth")
    target = net(labels=5)
    report = check_weights(load_weights(ckpt), target)
    assert report.loadable
    assert keys_of(report, "shape", False) == {k for k in target.state_dict() if ".seg_layers." in k}
    assert "segmentation heads differ" in report.text()
    nnunet_load(target, ckpt)


def test_extra_keys_are_ignored(tmp_path):
    state = dict(net().state_dict())
    state["extra.head.weight"] = torch.zeros(2, 3)
    report = check_weights(load_weights(save({"network_weights": state}, tmp_path / "a.pth")), net())
    assert report.loadable
    assert keys_of(report, "unexpected", False) == {"extra.head.weight"}


def test_channel_count_mismatch_is_the_first_conv_and_hints_adapt(tmp_path):
    ckpt = save({"network_weights": net(channels=1).state_dict()}, tmp_path / "a.pth")
    report = check_weights(load_weights(ckpt), net(channels=2))
    assert not report.loadable
    assert keys_of(report, "shape", True) == set(FIRST) and keys_of(report, "missing") == set()
    assert any(f"weights adapt {ckpt} -o ADAPTED.pth --in-channels 2" in h for h in report.hints)


@pytest.mark.parametrize("wrap, problem", [
    (lambda sd: sd, "nnU-Net reads checkpoint['network_weights']; this file is a plain state dict"),
    (lambda sd: {"state_dict": sd}, "this file is a 'state_dict' dict"),
    (lambda sd: {"network_weights": {"_orig_mod." + k: v for k, v in sd.items()}},
     "keys carry 'module.'/'_orig_mod.' prefixes (e.g. '_orig_mod.encoder"),
])
def test_formats_nnunet_cannot_read_are_reported_and_compared_after_stripping(tmp_path, wrap, problem):
    ckpt = save(wrap(net().state_dict()), tmp_path / "a.pth")
    report = check_weights(load_weights(ckpt), net())
    assert not report.loadable and report.mismatches == []
    assert any(problem in p for p in report.problems), report.problems
    assert f"nnunet_transfer weights adapt {ckpt} -o ADAPTED.pth" in report.text()


def test_checkpoint_saved_on_gpu_is_a_problem_without_cuda(tmp_path, monkeypatch):
    weights = load_weights(save({"network_weights": net().state_dict()}, tmp_path / "a.pth"))
    weights.devices = ["cuda:0"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    report = check_weights(weights, net())
    assert not report.loadable
    assert "saved on cuda:0 and nnU-Net loads without map_location" in report.problems[0]


@pytest.mark.parametrize("content, message", [
    (None, r"checkpoint .*missing\.pth not found"),
    (b"not a pickle", r"is not a checkpoint torch.load can read"),
    ({"epoch": 3}, r"holds a dict with keys \['epoch'\]; expected an nnU-Net checkpoint"),
    ({"network_weights": {"a": 1}}, r"the network_weights dict holds no tensors"),
    ({"module.a": torch.zeros(1), "a": torch.zeros(1)}, r"keys 'a' and another one both become 'a'"),
])
def test_load_errors(tmp_path, content, message):
    path = tmp_path / "missing.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(DataError, match=message):
        load_weights(path)


# --------------------------------------------------------------------------- adapt: the laws
def conv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.conv3d(x.double(), w.double(), padding=1)


@pytest.mark.parametrize("c, k", [(1, 1), (1, 2), (1, 4), (2, 4), (2, 3), (3, 2), (4, 3), (4, 1)])
def test_repeat_preserves_the_response_when_channels_correspond(c, k):
    torch.manual_seed(0)
    w = torch.randn(5, c, 3, 3, 3)
    w2 = adapt_first_conv(w, in_channels=k, method="repeat")
    assert w2.shape == (5, k, 3, 3, 3) and w2.dtype == w.dtype
    if k >= c:  # new channel j shows what old channel j mod C showed
        old = torch.randn(1, c, 6, 6, 6)
        new = old[:, [j % c for j in range(k)]]
    else:  # old channels c ≡ j (mod K) showed the same image, which new channel j shows
        new = torch.randn(1, k, 6, 6, 6)
        old = new[:, [i % k for i in range(c)]]
    torch.testing.assert_close(conv(new, w2), conv(old, w), rtol=1e-5, atol=1e-5)
    if c == k:
        assert torch.equal(w2, w)


@pytest.mark.parametrize("c, k", [(1, 3), (3, 1), (2, 5), (4, 4)])
def test_mean_preserves_the_response_to_identical_channels(c, k):
    torch.manual_seed(1)
    w = torch.randn(4, c, 3, 3, 3)
    w2 = adapt_first_conv(w, in_channels=k, method="mean")
    x = torch.randn(1, 1, 6, 6, 6)
    torch.testing.assert_close(conv(x.expand(-1, k, -1, -1, -1), w2), conv(x.expand(-1, c, -1, -1, -1), w),
                               rtol=1e-5, atol=1e-5)  # w / K is rounded to float32
    assert all(torch.equal(w2[:, 0], w2[:, j]) for j in range(k))


@pytest.mark.parametrize("c, k", [(1, 3), (3, 2), (2, 2)])
def test_first_keeps_only_channel_zero(c, k):
    torch.manual_seed(2)
    w = torch.randn(4, c, 3, 3, 3)
    w2 = adapt_first_conv(w, in_channels=k, method="first")
    x = torch.randn(1, 1, 6, 6, 6)
    old = torch.cat([x, torch.zeros(1, c - 1, 6, 6, 6)], 1)
    torch.testing.assert_close(conv(x.expand(-1, k, -1, -1, -1), w2), conv(old, w), rtol=1e-5, atol=1e-5)


def test_adapt_writes_what_nnunet_loads_and_keeps_aliases_one_tensor(tmp_path):
    source = net(channels=1, seed=3)
    wrapped = {"network_weights": {"module." + k: v for k, v in source.state_dict().items()}}
    ckpt = save(wrapped, tmp_path / "src.pth")
    result = adapt_weights(ckpt, tmp_path / "out.pth", in_channels=2, method="repeat")
    assert result.channels == (1, 2) and sorted(result.first_conv) == sorted(FIRST)
    saved = read_checkpoint(tmp_path / "out.pth", trust=False)
    state = saved["network_weights"]
    assert set(state) == set(source.state_dict())
    assert len({state[k].untyped_storage().data_ptr() for k in FIRST}) == 1
    assert all(v.device.type == "cpu" for v in state.values())
    target = net(channels=2, seed=4)
    nnunet_load(target, tmp_path / "out.pth")
    # identical channels: the whole network answers as the source does (the heads were loaded by hand
    # here, nnU-Net leaves them random)
    sd = target.state_dict()
    for k in sd:
        if ".seg_layers." in k:
            sd[k].copy_(source.state_dict()[k])
    source.eval(), target.eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(target(x.expand(-1, 2, -1, -1, -1))[0], source(x)[0], rtol=1e-4, atol=1e-5)


def test_adapt_without_channels_only_rewrites(tmp_path):
    sd = net().state_dict()
    ckpt = save({"_orig_mod." + k: v for k, v in sd.items()}, tmp_path / "plain.pth")
    result = adapt_weights(ckpt, tmp_path / "out.pth")
    assert result.channels is None and result.first_conv == []
    report = check_weights(load_weights(tmp_path / "out.pth"), net())
    assert report.loadable


def test_first_conv_of_residual_encoder_unet():
    plans = load_plans()
    arch = plans["configurations"]["tiny"]["architecture"]
    arch["network_class_name"] = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    arch["arch_kwargs"]["n_blocks_per_stage"] = arch["arch_kwargs"].pop("n_conv_per_stage")
    state = build_network(plans, "tiny", dataset_json()).state_dict()
    assert find_first_conv(state) == ["encoder.stem.convs.0.conv.weight",
                                      "decoder.encoder.stem.convs.0.all_modules.0.weight",
                                      "decoder.encoder.stem.convs.0.conv.weight",
                                      "encoder.stem.convs.0.all_modules.0.weight"]


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(in_channels=0), ConfigError, r"--in-channels must be an integer >= 1, got 0"),
    (dict(in_channels=-2), ConfigError, r"--in-channels must be an integer >= 1, got -2"),
    (dict(in_channels=2, method="tile"), ConfigError, r"unknown method 'tile'; choose one of repeat, mean, first"),
    (dict(method="tile"), ConfigError, r"unknown method 'tile'"),
])
def test_adapt_argument_errors(tmp_path, kwargs, error, message):
    ckpt = save({"network_weights": net().state_dict()}, tmp_path / "a.pth")
    with pytest.raises(error, match=message):
        adapt_weights(ckpt, tmp_path / "out.pth", **kwargs)
    assert not (tmp_path / "out.pth").exists()


def test_adapt_file_errors(tmp_path):
    ckpt = save({"network_weights": net().state_dict()}, tmp_path / "a.pth")
    with pytest.raises(DataError, match=r"checkpoint .*nope\.pth not found"):
        adapt_weights(tmp_path / "nope.pth", tmp_path / "out.pth", in_channels=2)
    with pytest.raises(ConfigError, match=r"is the input checkpoint"):
        adapt_weights(ckpt, ckpt, in_channels=2)
    (tmp_path / "out.pth").write_text("x")
    with pytest.raises(ConfigError, match=r"out\.pth exists; pass --force"):
        adapt_weights(ckpt, tmp_path / "out.pth", in_channels=2)
    adapt_weights(ckpt, tmp_path / "out.pth", in_channels=2, force=True)
    with pytest.raises(DataError, match=r"folder .*no_dir does not exist"):
        adapt_weights(ckpt, tmp_path / "no_dir" / "out.pth", in_channels=2)
    other = save({"network_weights": {"head.weight": torch.zeros(3, 4), "head.bias": torch.zeros(3)}},
                 tmp_path / "mlp.pth")
    with pytest.raises(DataError, match=r"no first convolution found: expected a key "
                                        r"'encoder.stages.0.0.convs.0.conv.weight'"):
        adapt_weights(other, tmp_path / "o2.pth", in_channels=2)


# --------------------------------------------------------------------------- CLI
@pytest.fixture
def target_env(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "pre" / NAME
    folder.mkdir(parents=True)
    (folder / "nnUNetPlans.json").write_text(json.dumps(load_plans()))
    (folder / "dataset.json").write_text(json.dumps(dataset_json(channels=2)))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    monkeypatch.delenv("nnUNet_raw", raising=False)
    monkeypatch.delenv("nnUNet_results", raising=False)
    return tmp_path


def test_cli_check_exit_codes_and_json(target_env, capsys):
    ckpt = save({"network_weights": net(channels=1).state_dict()}, target_env / "src.pth")
    assert main(["weights", "check", str(ckpt), "-d", "902", "-c", "tiny", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["loadable"] is False and report["target"] == f"{NAME} / nnUNetPlans / tiny"
    assert {k for m in report["mismatches"] for k in m["keys"]} == set(FIRST)
    assert main(["weights", "adapt", str(ckpt), "-o", str(target_env / "two.pth"), "--in-channels", "2"]) == 0
    out = capsys.readouterr().out
    assert "first convolution encoder.stages.0.0.convs.0.conv.weight (+3 aliases): (4, 1, 3, 3, 3) -> " \
           "(4, 2, 3, 3, 3) by 'repeat'" in out
    assert main(["weights", "check", str(target_env / "two.pth"), "-d", "902", "-c", "tiny"]) == 0
    assert "OK: -pretrained_weights will load" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["weights", "check", "{t}/nope.pth", "-d", "902", "-c", "tiny"], "checkpoint {t}/nope.pth not found"),
    (["weights", "check", "{t}/src.pth", "-d", "902", "-c", "3d_lowres"],
     "configuration '3d_lowres' is not in plans 'nnUNetPlans'; available: ['2d', '3d_fullres', 'other', 'tiny']"),
    (["weights", "check", "{t}/src.pth", "-d", "902", "-c", "tiny", "-p", "Nope"], "plans {t}/pre/" + NAME
     + "/Nope.json not found"),
    (["weights", "adapt", "{t}/src.pth", "-o", "{t}/o.pth", "--in-channels", "0"],
     "--in-channels must be an integer >= 1, got 0"),
    (["weights", "adapt", "{t}/src.pth", "-o", "{t}/o.pth", "--in-channels", "2", "--method", "avg"],
     "unknown method 'avg'; choose one of repeat, mean, first"),
    (["weights", "adapt", "{t}/nope.pth", "-o", "{t}/o.pth", "--in-channels", "2"], "checkpoint {t}/nope.pth not found"),
])
def test_cli_errors_are_one_line_exit_2(target_env, capsys, argv, message):
    save({"network_weights": net().state_dict()}, target_env / "src.pth")
    t = str(target_env)
    assert main([a.format(t=t) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nnunet_transfer weights: error: ")
    assert message.format(t=t) in err
