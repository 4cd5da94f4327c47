"""The end-of-epoch step of early stopping, without a trainer: state, decisions and log lines by value."""
from __future__ import annotations

from nnunet_transfer.training.stopping import EarlyStopping, best_follows_monitor, end_of_epoch, stopped_text


def run(monitor: str, values: list[float], *, patience: int, num_epochs: int, key: str):
    state, ends = EarlyStopping(monitor, patience).state(), []
    for epoch, v in enumerate(values, 1):
        end = end_of_epoch(state, {key: v}.__getitem__, epoch, num_epochs)
        ends.append(end)
        state = end.state
        if end.stop:
            break
    return ends


def test_val_loss_stops_after_patience_and_says_so():
    ends = run("val_loss", [0.5, 0.4, 0.45, 0.41], patience=2, num_epochs=10, key="val_losses")
    assert [(e.stop, e.new_best) for e in ends] == [(False, True), (False, True), (False, False), (True, False)]
    st = ends[-1].state
    assert (st["stopped_epoch"], st["best_epoch"], st["best"], st["converged"]) == (4, 2, 0.4, True)
    assert st["epochs_without_improvement"] == 2
    assert ends[1].messages == ("new best val_loss 0.4 (epoch 2)",)
    assert ends[2].messages == ()
    assert ends[3].messages == ("early stopping after epoch 4: val_loss has not improved for 2 epochs "
                                "(best 0.4 at epoch 2)",)
    assert stopped_text(st) == "this run stopped early after epoch 4 (val_loss); nothing to continue"


def test_reaching_num_epochs_without_a_stop_is_not_converged():
    ends = run("ema_dice", [0.1, 0.2, 0.3], patience=5, num_epochs=3, key="ema_fg_dice")
    assert [e.stop for e in ends] == [False, False, False] and all(e.new_best for e in ends)
    st = ends[-1].state
    assert (st["converged"], st["stopped_epoch"], st["best_epoch"], st["best"]) == (False, None, 3, 0.3)
    assert ends[-1].messages[-1] == ("NOT CONVERGED: no early stop within num_epochs=3 (ema_dice last improved at "
                                     "epoch 3, patience 5)")
    assert stopped_text(st) is None and stopped_text(None) is None


def test_the_given_state_is_not_changed():
    state = EarlyStopping("val_loss", 3).state()
    before = dict(state)
    end = end_of_epoch(state, {"val_losses": 1.0}.__getitem__, 1, 10)
    assert state == before and end.state["best"] == 1.0 and end.state["last_epoch"] == 1


def test_checkpoint_best_follows_the_monitor_only_where_nnunets_differs():
    assert best_follows_monitor("val_loss")
    assert not best_follows_monitor("ema_dice")  # nnU-Net's own best is by EMA pseudo-Dice already
    assert not best_follows_monitor("none")
