"""The study file: every bad input is a clear problem at load, naming the value, what is valid and the fix; a
file with several problems gets all of them in one error, one line each."""
from __future__ import annotations

import math
import textwrap

import pytest

from nnunet_transfer.config import TransferConfig
from nnunet_transfer.errors import ConfigError, DataError
from nnunet_transfer.study.model import sweep_label
from nnunet_transfer.study.problems import StudyFileError
from nnunet_transfer.study.spec import load_study

from study.fake_tree import DEFAULT_STUDY, make_tree, set_env


@pytest.fixture
def tree(tmp_path, monkeypatch):
    set_env(monkeypatch, tmp_path)
    make_tree(tmp_path, n_cases=8)
    return tmp_path


def write(tree, text: str):
    path = tree / "s.toml"
    path.write_text(textwrap.dedent(text))
    return path


def edit(old: str, new: str) -> str:
    assert old in DEFAULT_STUDY, old
    return DEFAULT_STUDY.replace(old, new, 1)


def test_the_default_file_loads(tree):
    s = load_study(write(tree, DEFAULT_STUDY))
    assert s.dataset == "Dataset950_Fake" and s.name == "fake" and s.baseline == "scratch"
    assert [x.name for x in s.strategies] == ["scratch", "frozen"]
    assert s.output == (tree / "fake").resolve()
    assert s.configuration_of(s.strategies[1]) == "fake_frozen"
    assert s.effective_settings(s.strategies[0]) == {"num_epochs": 4, "seed": 0}


def test_scoring_correction(tree):
    assert load_study(write(tree, DEFAULT_STUDY)).scoring.correction == "holm"  # compare's default
    s = load_study(write(tree, edit("resamples = 200", 'resamples = 200\ncorrection = "none"')))
    assert s.scoring.correction == "none"


BAD = [
    # (replace, with, error type, words the one-line message must hold)
    ("[scoring]", "[scorin]", ConfigError, ["[scorin]", "unknown table", "did you mean 'scoring'"]),
    ('baseline = "scratch"', 'baseline = "scratch"\nbasline = 1', ConfigError, ["basline", "did you mean 'baseline'"]),
    ('trainer = "nnUNetTrainerFrozenEncoder"', 'trainer = "nnUNetTrainerFrozenEncodr"', ConfigError,
     ['[[strategy]] #2 "frozen"', "unknown trainer 'nnUNetTrainerFrozenEncodr'", "did you mean 'nnUNetTrainerFrozenEncoder'"]),
    ('trainer = "nnUNetTrainerFrozenEncoder"', 'trainer = "nnUNetTrainer"', ConfigError,
     ["nnUNetTrainer is one of nnU-Net's own trainers", "use nnUNetTrainerTransferBase"]),
    ("num_epochs = 4", "num_epoch = 4", ConfigError, ["[settings]", "unknown setting 'num_epoch'", "num_epochs"]),
    ("num_epochs = 4", "num_epochs = 0", ConfigError, ["num_epochs", "integer >= 1, got 0"]),
    ("num_epochs = 4", 'trainable = "encoder"', ConfigError, ["'trainable' is not used by nnUNetTrainerTransferBase"]),
    ('baseline = "scratch"', 'baseline = "scratc"', ConfigError, ["baseline = 'scratc'", "did you mean 'scratch'"]),
    ("test = 3", "test = 3\nfolds = 5", ConfigError, ["exactly one way", "test, folds"]),
    ('n_train = [2, "all"]', 'n_train = [2, "lots"]', ConfigError, ["n_train 'lots' is not a size"]),
    ('n_train = [2, "all"]', "n_train = [2, 2]", ConfigError, ["lists a size twice"]),
    ('target = 950', 'target = 951', DataError, ["target = 951", "no dataset with id 951"]),
    ('configuration = "3d_fullres"', 'configuration = "3d_lowres"', DataError,
     ["configuration = '3d_lowres'", "available: ['2d', '3d_fullres']", "plans transfer"]),
    ('device = "cpu"', 'device = "gpu"', ConfigError, ["device = 'gpu'", "cuda, cpu, mps"]),
    ("resamples = 200", "resamples = 200\nmetrics = [\"dice\", \"hd96\"]", ConfigError,
     ["unknown metric 'hd96'", "did you mean 'hd95'"]),
    ("resamples = 200", 'resamples = 200\ncorrection = "bonferroni"', ConfigError,
     ["[scoring]", "correction = 'bonferroni' is not one of 'holm', 'none'", "uncorrected"]),
]


@pytest.mark.parametrize("old,new,cls,words", BAD, ids=[b[1].split("\n")[-1][:30] for b in BAD])
def test_bad_input_is_one_clear_error(tree, old, new, cls, words):
    path = write(tree, edit(old, new))
    with pytest.raises(cls) as e:
        load_study(path)
    msg = str(e.value)
    assert msg.startswith(f"study file {path.resolve()}") and "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_missing_checkpoint_and_unset_variable(tree, monkeypatch):
    text = edit("[splits]", '[pretrained]\nsource = "$nnUNet_results/nope/fold_0"\n\n[splits]')
    text = text.replace('trainer = "nnUNetTrainerFrozenEncoder"', 'trainer = "nnUNetTrainerFinetune"\npretrained = "source"')
    with pytest.raises(DataError, match=r"\[pretrained\]: source = .*checkpoint .*nope/fold_0 not found"):
        load_study(write(tree, text))
    monkeypatch.delenv("nnUNet_results")
    with pytest.raises(DataError, match=r"uses \$nnUNet_results, which is not set"):
        load_study(write(tree, text))


def test_strategy_that_needs_pretrained_weights_names_the_fix(tree):
    text = edit('trainer = "nnUNetTrainerFrozenEncoder"', 'trainer = "nnUNetTrainerFrozenDecoder"')
    with pytest.raises(ConfigError, match=r"nnUNetTrainerFrozenDecoder needs pretrained weights .*add pretrained = "
                                          r"\"NAME\""):
        load_study(write(tree, text))


def test_unknown_pretrained_reference(tree):
    text = edit('trainer = "nnUNetTrainerFrozenEncoder"', 'trainer = "nnUNetTrainerFinetune"\npretrained = "src"')
    with pytest.raises(ConfigError, match=r"pretrained = 'src' is not a checkpoint of \[pretrained\] \(none declared\)"):
        load_study(write(tree, text))


def test_sweep_expands_into_named_strategies_with_inf_as_the_plans_hold_it(tree):
    ckpt = tree / "source.pth"
    ckpt.write_bytes(b"x")
    text = edit("[splits]", f'[pretrained]\nsource = "{ckpt}"\n\n[splits]') + textwrap.dedent("""
        [[strategy]]
        name = "l2sp"
        trainer = "nnUNetTrainerL2SP_Sagie"
        pretrained = true
        sweep = { l2sp_alpha = [0, 0.5, 8, inf] }
        """)
    s = load_study(write(tree, text))
    swept = s.sweeps["l2sp"]
    assert [x.name for x in swept] == ["l2sp-0", "l2sp-0.5", "l2sp-8", "l2sp-inf"]
    assert [x.settings["l2sp_alpha"] for x in swept] == [0, 0.5, 8, "inf"]  # JSON has no infinity
    assert math.isinf(swept[-1].sweep_value) and sweep_label(swept[-1].sweep_value) == "inf"
    assert all(x.pretrained == "source" and x.family == "l2sp" for x in swept)


def test_sweep_errors(tree):
    base = edit("[splits]", '[pretrained]\nsource = "s.pth"\n\n[splits]')
    (tree / "s.pth").write_bytes(b"x")
    for sweep, words in (("{ l2sp_alpa = [0, 1] }", "sweep setting 'l2sp_alpa' is not a setting (did you mean 'l2sp_alpha'?)"),
                         ("{ l2sp_alpha = [1] }", "needs a list of at least two values"),
                         ("{ l2sp_alpha = [1, 1.0] }", "lists a value twice"),
                         ("{ l2sp_alpha = [0, -1] }", "must be a number >= 0")):
        text = base + f'\n[[strategy]]\nname = "l2sp"\ntrainer = "nnUNetTrainerL2SP_Sagie"\npretrained = true\nsweep = {sweep}\n'
        with pytest.raises(ConfigError) as e:
            load_study(write(tree, text))
        assert words in str(e.value)


def test_not_toml_and_no_file(tree):
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_study(write(tree, "[study\nname="))
    with pytest.raises(DataError, match="not found; write one with `nnunet_transfer study init"):
        load_study(tree / "none.toml")


def problems_of(path) -> list[str]:
    with pytest.raises(StudyFileError) as e:
        load_study(path)
    lines = str(e.value).splitlines()
    assert lines[0] == f"study file {path.resolve()} has {len(e.value.problems)} problems:"
    assert lines[1:] == [f"  {p}" for p in e.value.problems]
    return e.value.problems


def test_every_strategys_settings_are_checked_not_only_the_first(tree):
    text = (edit("num_epochs = 4", "num_epochs = 0")
            .replace('name = "scratch"\n', 'name = "scratch"\nsettings = { lr_scale = 0, warmup_epochs = -2 }\n')
            .replace('name = "frozen"\n', 'name = "frozen"\nsettings = { freeze_seg = "yes", lr_scal = 1 }\n'))
    assert problems_of(write(tree, text)) == [
        "[settings] num_epochs: must be an integer >= 1, got 0",
        '[[strategy]] #1 "scratch" settings.lr_scale: must be a finite number > 0, got 0',
        '[[strategy]] #1 "scratch" settings.warmup_epochs: must be an integer >= 0, got -2',
        '[[strategy]] #2 "frozen" settings.freeze_seg: must be true or false, got \'yes\'',
        '[[strategy]] #2 "frozen": unknown setting \'lr_scal\' (did you mean \'lr_scale\'?); settings: '
        + ", ".join(TransferConfig.keys()),
    ]


def test_missing_tables_are_all_named_and_the_rest_is_still_checked(tree):
    text = '[study]\ntarget = 950\ndevice = "gpu"\n\n[scoring]\ntest = "t"\n'
    problems = problems_of(write(tree, text))
    assert problems[:2] == ["[splits]: missing: a study file needs a [splits] table (see `nnunet_transfer study init`)",
                            "[strategy]: missing: a study file needs [[strategy]] entries (see `nnunet_transfer study "
                            "init`)"]
    assert problems[2].startswith("[study]: device = 'gpu' is not one of cuda, cpu, mps")
    assert problems[3].startswith("[scoring]: test = 't' is not one of ") and len(problems) == 4


def test_a_sweep_generated_name_colliding_with_a_strategy_is_refused(tree):
    text = DEFAULT_STUDY + textwrap.dedent("""
        [[strategy]]
        name = "l2sp"
        trainer = "nnUNetTrainerL2SP_Sagie"
        sweep = { l2sp_alpha = [0, 8] }
        settings = { allow_random_anchor = true }

        [[strategy]]
        name = "l2sp-8"
        trainer = "nnUNetTrainerL2SP_Sagie"
        settings = { allow_random_anchor = true }
        """)
    with pytest.raises(ConfigError) as e:
        load_study(write(tree, text))
    assert str(e.value) == (f"study file {(tree / 's.toml').resolve()} [[strategy]]: strategy name 'l2sp-8' appears "
                            f"more than once (#3, #4, counting the names a sweep generates); names must be unique "
                            f"(they name the configurations and the results folders)")


def test_a_bad_sweep_value_and_a_missing_checkpoint_are_listed_together(tree):
    text = edit("[splits]", '[pretrained]\nsource = "nope.pth"\n\n[splits]') + textwrap.dedent("""
        [[strategy]]
        name = "l2sp"
        trainer = "nnUNetTrainerL2SP_Sagie"
        pretrained = "source"
        sweep = { l2sp_alpha = [0, -1, inf] }
        """)
    problems = problems_of(write(tree, text))
    assert len(problems) == 2
    assert problems[0].startswith("[pretrained]: source = 'nope.pth': checkpoint ") and "not found" in problems[0]
    assert problems[1] == ('[[strategy]] #3 "l2sp" sweep.l2sp_alpha: value -1: must be a number >= 0 (or inf), '
                           'got -1')


def test_predict_checkpoint(tree):
    assert load_study(write(tree, DEFAULT_STUDY)).predict_checkpoint == "final"  # nnU-Net's default
    s = load_study(write(tree, DEFAULT_STUDY + '\n[predict]\ncheckpoint = "best"\n'))
    assert s.predict_checkpoint == "best"
    with pytest.raises(ConfigError) as e:
        load_study(write(tree, DEFAULT_STUDY + '\n[predict]\ncheckpoint = "latest"\n'))
    msg = str(e.value)
    assert "\n" not in msg and "[predict]" in msg and "checkpoint = 'latest' must be one of 'final', 'best'" in msg


# --------------------------------------------------------------------------- [analysis]
ANALYSIS_STUDY = edit('trainer = "nnUNetTrainerFrozenEncoder"',
                      'trainer = "nnUNetTrainerFinetune"\npretrained = "source"').replace(
    "[splits]", '[pretrained]\nsource = "source.pth"\n\n[splits]')


def analysis_study(tree, analysis: str) -> str:
    import torch

    torch.save({"network_weights": {}}, tree / "source.pth")
    return ANALYSIS_STUDY + "\n[analysis]\n" + textwrap.dedent(analysis)


def test_analysis_defaults_and_snapshot_every_reaches_every_strategys_settings(tree):
    s = load_study(write(tree, analysis_study(tree, "snapshot_every = 5\n")), check_data=False)
    a = s.analysis
    assert a.analyses == ("evolution", "groups", "reuse", "weights") and a.snapshot_every == 5
    assert a.ri == ("scratch",) and a.tl == ("frozen",) and a.groups_by == "size" and a.measure == "pwcca"
    assert a.layers is None and a.patches is None and a.voxels_per_patch is None
    assert all(s.effective_settings(x)["snapshot_every"] == 5 for x in s.strategies)
    assert load_study(write(tree, DEFAULT_STUDY)).analysis is None  # no [analysis]: nothing analysed, no snapshots
    s = load_study(write(tree, analysis_study(tree, 'snapshot_every = 1\nanalyses = ["weights", "groups"]\n'
                                                    'layers = "blocks:1,5"\ngroups_by = "all"\npatches = 2\n'
                                                    'voxels_per_patch = 64\nmeasure = "linear_cka"\n'
                                                    'tl = ["frozen"]\n')))
    a = s.analysis
    assert (a.analyses, a.layers, a.groups_by, a.patches, a.voxels_per_patch, a.measure) == (
        ("weights", "groups"), "blocks:1,5", "all", 2, 64, "linear_cka")


ANALYSIS_BAD = [
    ("snapshot_every = 5\nanalysis = []\n", ["unknown key 'analysis'", "did you mean 'analyses'"]),
    ('layers = "encoder"\n', ["snapshot_every is missing", "study plan"]),
    ("snapshot_every = 0\n", ["snapshot_every = 0 must be an integer >= 1"]),
    ('snapshot_every = "5"\n', ["snapshot_every = '5' must be an integer >= 1"]),
    ('snapshot_every = 5\nanalyses = ["evolution", "reuze"]\n', ["unknown analysis 'reuze'", "did you mean 'reuse'"]),
    ('snapshot_every = 5\nanalyses = "weights"\n', ["analyses = 'weights' must be a non-empty list"]),
    ('snapshot_every = 5\nlayers = "blocks:1,99"\n', ["layers = 'blocks:1,99'", "99"]),
    ("snapshot_every = 5\nlayers = 3\n", ["layers = 3 must be a non-empty string"]),
    ('snapshot_every = 5\ngroups_by = "sizes"\n', ["groups_by = 'sizes' must be \"size\"", "\"all\""]),
    ("snapshot_every = 5\npatches = 0\n", ["patches = 0 must be an integer >= 1"]),
    ("snapshot_every = 5\nvoxels_per_patch = 1.5\n", ["voxels_per_patch = 1.5 must be an integer >= 1"]),
    ('snapshot_every = 5\nmeasure = "pwcc"\n', ["measure = 'pwcc' is not one of", "did you mean 'pwcca'"]),
    ('snapshot_every = 5\ntl = ["frozn"]\n', ["tl: 'frozn' is not a strategy", "did you mean 'frozen'"]),
    ('snapshot_every = 5\ntl = ["scratch"]\n', ["tl: strategy 'scratch' starts from no pretrained weights"]),
    ('snapshot_every = 5\ntl = "frozen"\n', ["tl = 'frozen' must be a non-empty list of strategy names"]),
]


@pytest.mark.parametrize("analysis,words", ANALYSIS_BAD, ids=[b[0].splitlines()[-1][:30] for b in ANALYSIS_BAD])
def test_analysis_bad_input_is_one_clear_error(tree, analysis, words):
    path = write(tree, analysis_study(tree, analysis))
    with pytest.raises(ConfigError) as e:
        load_study(path, check_data="99" in analysis)  # the block range needs the plans (check_data)
    msg = str(e.value)
    assert msg.startswith(f"study file {path.resolve()} [analysis]: ") and "\n" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)


def test_analysis_problems_are_listed_with_the_others_and_snapshot_every_only_once(tree):
    text = analysis_study(tree, 'snapshot_every = 5\nmeasure = "x"\n').replace("num_epochs = 4",
                                                                             "num_epochs = 4\nsnapshot_every = 2")
    problems = problems_of(write(tree, text.replace("resamples = 200", "resamples = 1")))
    assert problems == ["[analysis]: snapshot_every is set in [analysis] and in [settings] (2); keep the one in "
                        "[analysis]",
                        "[analysis]: measure = 'x' is not one of pwcca, mean_cca, svcca, linear_cka",
                        "[scoring]: resamples = 1 must be an integer >= 100"]


def test_analysis_needs_a_scratch_baseline_and_a_transfer_strategy(tree):
    with pytest.raises(ConfigError, match=r"\[analysis\]: no T.L. strategy: no strategy names pretrained weights"):
        load_study(write(tree, DEFAULT_STUDY + "\n[analysis]\nsnapshot_every = 1\n"))
    text = analysis_study(tree, "snapshot_every = 1\n").replace('baseline = "scratch"', 'baseline = "frozen"')
    with pytest.raises(ConfigError, match=r"the baseline 'frozen' starts from pretrained weights; .* \(R.I.\)"):
        load_study(write(tree, text), check_data=False)
