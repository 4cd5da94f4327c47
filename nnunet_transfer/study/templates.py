"""``study init --template karimi|amiri|sagie``: a study file with one paper's protocol.

The sizes are worked out from the target's number of training cases, so the file passes ``study plan``
as written; the comments say where each number comes from in the paper and what to change.

* **karimi** — Karimi, Warfield & Gholipour 2021 (Artif Intell Med 116:102078): from scratch (R.I.),
  fine-tuning every layer with the initial LR halved (T.L.), the encoder frozen at its *random*
  initialisation with the decoder trained (Fig. 11), and both frozen-decoder variants (Sec. 3.8: encoder +
  last layer trained; encoder only, decoder and output layer fixed), on nested small target training
  sets (6 and 15 images as for Liver-CT, Table 3, and all) with one held-out test set; Dice, HD95, ASSD,
  lesion F1, paired t-tests without correction for multiple comparisons (as the paper's tables).
* **amiri** — Amiri, Brooks & Rivaz 2020 (IEEE TUFFC): the 12 block-wise fine-tuning strategies of
  Table II and from scratch, 5-fold cross-validation, 80 / 50 / 5 % of the data for training (of which
  20 % validation); Adam at 1e-4, early stopping on the validation loss (patience 20, at most 200 epochs), the
  best-validation checkpoint tested; Dice, t-tests and Tukey's HSD.
* **sagie** — Sagie, Greenspan & Goldberger 2021: L2-SP on the encoder with the decoder trained from
  scratch, λ ∈ {0, 1e-4, 1e-3, 1e-2, 0.1, 1, 10, ∞}: the range over which the encoder's drift goes from
  fine-tuning's to near zero under nnU-Net's optimiser (measured by ``benchmarks/sagie_lambda.py``; the
  paper's {0, 1, 2, 4, 8, 16, 50, ∞} of Fig. 1, tuned for its own loss and optimiser, covers only the
  near-frozen end here and is written as a comment to switch to); λ = 0 is plain transfer by initialisation, ∞
  freezes the encoder; the paper's 21 / 3 / 5 train / validation / test split scaled to the dataset; Dice
  and precision against λ = 0 by uncorrected paired t-tests (the paper's p-values).
"""
from __future__ import annotations

import json
from pathlib import Path

from nnunet_transfer.analysis.activations import default_layer_spec
from nnunet_transfer.blocks import parse_spec
from nnunet_transfer.errors import ConfigError, DataError, SpecError
from nnunet_transfer.nnunet_io import check_configuration, dataset_name, load_plans
from nnunet_transfer.plans.configure import resolved_configuration
from nnunet_transfer.study.folds import dataset_cases
from nnunet_transfer.study.spec import load_study

TEMPLATES = ("karimi", "amiri", "sagie")
#: Table II's order; the paper's block numbers for its 9-block U-Net (N = 5)
AMIRI = (("whole", "whole network (blocks 1-9)"), ("contracting", "contracting path (1-4, 5a)"),
         ("expanding", "expanding path (5b, 6-9)"), ("exceptBottleneck", "all but block 5"),
         ("bottleneck", "block 5 (bottleneck)"), ("outer", "blocks 1, 2, 8, 9"), ("inner", "blocks 3-7"),
         ("first", "block 1"), ("last", "block 9"), ("firstLast", "blocks 1, 9"), ("first2", "blocks 1, 2"),
         ("deepEncoder", "blocks 3, 4"))
#: λ where it matters under nnU-Net's SGD (momentum 0.99, LR 1e-2) and Dice + CE: the encoder's drift is
#: fine-tuning's at 1e-2 and below on a 30-step run (longer runs move that end down) and 3 % of it at 10;
#: λ ≥ 67 exceeds Nesterov SGD's stability limit at LR 1e-2 (examples/sagie/README.md)
SAGIE_LAMBDAS = "[0, 1e-4, 1e-3, 1e-2, 0.1, 1, 10, inf]"
#: Sagie et al.'s grid as written (Fig. 1)
SAGIE_PAPER_LAMBDAS = "[0, 1, 2, 4, 8, 16, 50, inf]"


def _q(text: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's)."""
    return json.dumps(str(text), ensure_ascii=False)


def _counts(dataset: str) -> int:
    return len(dataset_cases(dataset)[0])


def _n_stages(dataset: str, plans: str, configuration: str) -> int | None:
    content = load_plans(dataset, plans)
    check_configuration(content, configuration)
    kw = resolved_configuration(content, configuration).get("architecture", {}).get("arch_kwargs", {})
    return kw.get("n_stages")


def _header(template: str, dataset: str, configuration: str, name: str, pretrained: Path, baseline: str,
            device: str) -> list[str]:
    return ["[study]", f"name = {_q(name)}", f"target = {_q(dataset)}",
            f"configuration = {_q(configuration)}   # preprocessed with the source's plans (nnunet_transfer plans "
            f"transfer)", f"baseline = {_q(baseline)}", f"device = {_q(device)}", "",
            "[pretrained]", f"source = {_q(pretrained)}", ""]


def _strategy(name: str, trainer: str, title: str, *, pretrained: bool, extra: list[str] | None = None,
              comment: str | None = None, disabled: bool = False) -> list[str]:
    lines = [f"# {comment}"] if comment else []
    body = ["[[strategy]]", f"name = {_q(name)}", f"trainer = {_q(trainer)}", f"title = {_q(title)}"]
    if pretrained:
        body.append('pretrained = "source"')
    body += extra or []
    lines += [f"# {ln}" for ln in body] if disabled else body
    return lines + [""]


def karimi(dataset: str, n: int, *, n_stages: int | None = None, **kw) -> list[str]:
    test = max(2, round(0.2 * n))
    pool = n - test
    val = max(1, round(0.2 * pool))
    available = pool - val
    if available < 2:
        raise DataError(f"{dataset} has {n} training cases: too few for Karimi's protocol (a held-out test set, "
                        f"validation cases and at least two training-set sizes)")
    sizes = [s for s in (6, 15) if s < available] or [max(1, available // 2)]
    sizes_text = ", ".join(map(str, sizes)) + ', "all"'
    return [
        "# Karimi, Warfield & Gholipour 2021, \"Transfer learning in medical image segmentation: new insights from",
        "# analysis of the dynamics of model parameters and learned representations\", Artif Intell Med 116:102078.",
        "# A model pretrained on the source is fine-tuned on small target training sets and compared with",
        "# training from scratch on the same held-out test images; plus a random frozen encoder (Fig. 11) and",
        "# the two frozen-decoder variants of Sec. 3.8. Paired t-tests at p = 0.05 (Tables 3-5).", "",
        *_header("karimi", dataset, kw["configuration"], kw["name"], kw["pretrained"], "scratch", kw["device"]),
        "[splits]",
        f"# Liver-CT: 15 and 6 target training images (Table 3); CP fetal: 5 and all (Table 4). {dataset} has",
        f"# {n} training cases: {test} held out for testing (about 20 %, as CP-newborn's 108 of 558), {val} for",
        f"# validation, {available} left to draw the nested subsets from.",
        f"n_train = [{sizes_text}]", f"test = {test}", f"val = {val}",
        "repeats = 1                 # one draw per size, as in the paper; more give error bars over subsets",
        "seed = 0", "",
        "[settings]",
        "seed = 0                    # nnU-Net sets no seed; the random frozen encoder needs one to be reproducible",
        "# nnU-Net's schedule (1000 epochs x 250 iterations); Karimi et al. trained to convergence", "",
        "[scoring]",
        'metrics = ["dice", "hd95", "assd", "lesion_f1", "precision", "recall"]',
        'test = "ttest"              # paired t-tests, as the paper',
        'correction = "none"         # uncorrected, as the paper\'s tables (Tables 3-6, p = 0.05); "holm" corrects',
        "nsd_tolerance = 1.0", "",
        *_karimi_analysis(n_stages),
        *_strategy("scratch", "nnUNetTrainerTransferBase", "random initialisation (R.I.)", pretrained=False),
        *_strategy("finetune", "nnUNetTrainerFinetune", "transfer learning (T.L.): every layer, initial LR halved",
                   pretrained=True),
        *_strategy("frozen_random_encoder", "nnUNetTrainerFrozenEncoder",
                   "encoder frozen at its random initialisation, decoder trained (Fig. 11)", pretrained=False),
        *_strategy("frozen_decoder", "nnUNetTrainerFrozenDecoder",
                   "pretrained decoder frozen; encoder and the last layer trained (Sec. 3.8)", pretrained=True),
        *_strategy("frozen_decoder_heads", "nnUNetTrainerFrozenDecoderAndHeads",
                   "pretrained decoder and output layer frozen; encoder trained (Sec. 3.8)", pretrained=True,
                   comment="the frozen output layer is copied from the source by label name, so every target label\n"
                           "# needs one in the source; else map them, background included: settings = { heads =\n"
                           "# \"background:background,pancreas:liver,cancer:cancer\" }"),
    ]


def _karimi_analysis(n_stages: int | None) -> list[str]:
    """[analysis] as the paper: its six layers (Fig. 1), the convergence epoch from the validation Dice."""
    layers = (f"layers = {_q(default_layer_spec(n_stages))}   # the paper's six layers (Fig. 1): encoder blocks 1, "
              f"ceil(N/2), N-1 and their decoder mirrors (N = {n_stages})") if n_stages else \
        "# layers: analyze's default, the paper's six layers (Fig. 1): encoder blocks 1, ceil(N/2), N-1 and mirrors"
    return [
        "[analysis]                  # `study report` runs Karimi et al.'s analyses on the runs (Figs. 6-10, Tables 8-9)",
        'analyses = ["evolution", "groups", "reuse", "weights"]',
        "snapshot_every = 50         # weights-only snapshots every 50 of nnU-Net's 1000 epochs (21 per run); the",
        "                            # convergence epoch (validation Dice within 0.5 % of its maximum) is one of them",
        layers,
        'tl = ["finetune"]           # T.L. = fine-tuning every layer, as the paper; R.I. = the baseline (scratch)',
        'groups_by = "all"           # groups pool the sizes (one run per size and strategy); Table 8 compares 10 R.I.',
        '                            # and 10 T.L. runs at one size: repeats = 10 and groups_by = "size"', "",
    ]


def amiri(dataset: str, n: int, *, n_stages: int | None, **kw) -> list[str]:
    if n < 10:
        raise DataError(f"{dataset} has {n} training cases: 5-fold cross-validation with 5 % of the data for "
                        f"training needs at least 10")
    lines = [
        "# Amiri, Brooks & Rivaz 2020, \"Fine-tuning U-Net for ultrasound image segmentation: different layers,",
        "# different outcomes\", IEEE TUFFC. The 12 block-wise fine-tuning strategies of Table II (which blocks",
        "# of the pretrained U-Net train; the others stay frozen) and training from scratch, each with 80, 50",
        "# and 5 % of the data, 5-fold cross-validation, t-tests with Tukey's correction.", "",
        *_header("amiri", dataset, kw["configuration"], kw["name"], kw["pretrained"], "scratch", kw["device"]),
        "[splits]",
        "folds = 5                   # 5-fold cross-validation: each fold's test set is held out once",
        "# 80 / 50 / 5 % of the data for training, 20 % of it for validation (Sec. II-C). Sizes here are",
        "# fractions of what remains after the test fold and the validation cases (64 % of the data):",
        "# all = 80 % of the data, 62.5 % = 50 %, 6.25 % = 5 % (training cases 64 %, 40 %, 4 % of the data).",
        'n_train = ["all", "62.5%", "6.25%"]', "seed = 0", "",
        "[settings]", "seed = 0",
        "# the paper's protocol (Sec. II-D): Adam at 1e-4 with no stated decay, early stopping once the validation",
        "# loss has not improved for 20 epochs, at most 200 epochs (a run that does not stop is 'failed': the",
        "# report counts them). nnU-Net's: optimizer = \"sgd\", no initial_lr, lr_schedule = \"poly\",",
        "# early_stopping = \"none\", num_epochs = 1000. Not the paper's: nnU-Net's Dice + CE loss (the paper: binary",
        "# cross-entropy) and batches per epoch (num_iterations_per_epoch, fixed across sizes as the paper's)",
        'optimizer = "adam"', "initial_lr = 1e-4", 'lr_schedule = "constant"', 'early_stopping = "val_loss"',
        "patience = 20", "num_epochs = 200", "",
        "[predict]",
        'checkpoint = "best"         # the best-validation model is tested, as the paper (checkpoint_best.pth)', "",
        "[scoring]", 'metrics = ["dice", "hd95", "precision", "recall"]',
        'test = "ttest"              # compare also writes Tukey\'s HSD over all strategies (tukey.csv)', "",
        *_strategy("scratch", "nnUNetTrainerTransferBase", "from scratch", pretrained=False),
    ]
    for i, (preset, blocks) in enumerate(AMIRI, 1):
        ok, why = True, None
        if n_stages:
            try:
                parse_spec(preset, int(n_stages))
            except SpecError as e:
                ok, why = False, str(e)
        lines += _strategy(preset, f"nnUNetTrainerPartialFT_{preset}", f"#{i} {blocks}", pretrained=True,
                           disabled=not ok,
                           comment=None if ok else f"not for this network ({n_stages} stages): {why}")
    return lines


def sagie(dataset: str, n: int, **kw) -> list[str]:
    test = max(2, round(5 / 29 * n))
    val = max(1, round(3 / 29 * n))
    if n - test - val < 1:
        raise DataError(f"{dataset} has {n} training cases: too few for a train / validation / test split")
    return [
        "# Sagie, Greenspan & Goldberger 2021, \"Transfer learning via parameter regularization for medical image",
        "# segmentation\". L2-SP on the encoder, λ‖θ_enc − θ̄_enc‖², with the decoder trained from scratch;",
        "# λ swept from 0 (plain transfer by initialisation) to ∞ (the encoder frozen), Fig. 1: Dice and",
        "# precision of the lesion class against λ, p-values against λ = 0.", "",
        *_header("sagie", dataset, kw["configuration"], kw["name"], kw["pretrained"], "l2sp-0", kw["device"]),
        "[splits]",
        f"# the paper: 29 scans, 21 train / 3 validation / 5 test, one random split. Scaled to {dataset}'s {n}",
        "# cases. For paired tests over more cases use cross-validation instead: folds = 5 (and drop test, val).",
        'n_train = ["all"]', f"test = {test}", f"val = {val}", "repeats = 1", "seed = 0", "",
        "[settings]", "seed = 0", "",
        "[scoring]", 'metrics = ["dice", "precision", "recall", "hd95"]',
        'correction = "none"         # the paper\'s p-values against λ = 0 are uncorrected; "holm" corrects',
        "# labels = [2]             # Sagie et al. score the opacity (lesion) class only: give its label value", "",
        *_strategy("l2sp", "nnUNetTrainerL2SP_Sagie", "L2-SP on the encoder, decoder from scratch",
                   pretrained=True, extra=[
                       "# λ where the encoder's drift goes from fine-tuning's to near zero under nnU-Net's SGD and",
                       "# Dice + CE (measured: benchmarks/sagie_lambda.py, examples/sagie/README.md)",
                       f"sweep = {{ l2sp_alpha = {SAGIE_LAMBDAS} }}",
                       "# the paper's grid as written (Fig. 1); here λ ≥ 1 holds the encoder to under a sixth of",
                       "# fine-tuning's drift:",
                       f"# sweep = {{ l2sp_alpha = {SAGIE_PAPER_LAMBDAS} }}"]),
    ]


def init_study(template: str, dataset: str | int, pretrained: str | Path, out: str | Path, *,
               configuration: str = "3d_fullres", plans: str = "nnUNetPlans", name: str | None = None,
               device: str = "cuda", force: bool = False) -> Path:
    """Write the template's study file for ``dataset`` to ``out``; it is checked (``load_study``) first."""
    if template not in TEMPLATES:
        raise ConfigError(f"--template {template!r} is not one of {', '.join(TEMPLATES)}")
    out = Path(out)
    if out.exists() and not force:
        raise DataError(f"{out} exists; --force replaces it")
    if out.suffix != ".toml":
        raise ConfigError(f"-o {out}: a study file is TOML; give a name ending in .toml")
    name = name or template
    ds = dataset_name(dataset)
    n = _counts(ds)
    ckpt = Path(pretrained).expanduser().resolve()
    kw = {"configuration": configuration, "name": name, "pretrained": ckpt, "device": device}
    if template == "karimi":
        lines = karimi(ds, n, n_stages=_n_stages(ds, plans, configuration), **kw)
    elif template == "amiri":
        lines = amiri(ds, n, n_stages=_n_stages(ds, plans, configuration), **kw)
    else:
        lines = sagie(ds, n, **kw)
    if plans != "nnUNetPlans":
        i = lines.index("[study]")
        lines.insert(i + 4, f"plans = {_q(plans)}")
    text = "\n".join(lines).rstrip() + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text)
    try:
        # the file passes what every command checks, or it is not written
        check = tmp.with_name(f".{out.stem}.check.toml")
        tmp.replace(check)
        load_study(check)
    except BaseException:
        check.unlink(missing_ok=True)
        raise
    check.replace(out)
    return out


__all__ = ["init_study", "TEMPLATES"]
