"""Early stopping on a quantity nnU-Net logs every epoch (setting ``early_stopping``).

Amiri et al. (2020), Sec. II-D: "training stops when a minimum loss was achieved on the validation set and no
improvement was observed for 20 epochs, and the best performing model on the validation set was saved for
evaluating the test set. [...] If early stopping did not occur in 200 epochs, the training was considered failed."

The rule, after every completed epoch ``e`` (1-based) with monitored value ``v_e``:

* ``v_e`` *improves* when there is no best yet or it is strictly better than the best so far (lower for
  ``val_loss``, nnU-Net's ``val_losses``; higher for ``ema_dice``, nnU-Net's ``ema_fg_dice`` — the same strict
  ``>`` nnU-Net uses for ``checkpoint_best.pth``). NaN never improves.
* the run *stops* after epoch ``e`` when there is a best and ``e − best_epoch ≥ patience``; it then counts as
  converged.
* a run that reaches ``num_epochs`` (the maximum) without stopping is **not converged** (the paper's "failed"
  run). The rule is also evaluated at the last epoch: a stop there is a stop.

The state is a plain dict (:meth:`EarlyStopping.state`) so that it travels in the checkpoint and in
``transfer_config.json`` and ``--c`` continues the count where it was. A trainer calls :func:`end_of_epoch`
after every epoch and :func:`stopped_text` before one; :func:`best_follows_monitor` says whether its
``checkpoint_best.pth`` follows the monitored quantity.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

#: setting value -> (nnU-Net logger key, direction)
MONITORS = {"val_loss": ("val_losses", "min"), "ema_dice": ("ema_fg_dice", "max")}
#: the logger key by which nnU-Net itself writes checkpoint_best.pth (its EMA pseudo-Dice)
NNUNET_BEST_KEY = "ema_fg_dice"


@dataclass
class EarlyStopping:
    """Patience-based stopping on one monitored quantity; epochs are counted 1-based (completed epochs)."""

    monitor: str
    patience: int
    best: float | None = None
    best_epoch: int | None = None
    last_epoch: int = 0
    stopped_epoch: int | None = None  # the epoch after which the rule fired
    converged: bool | None = None     # None while training; False: num_epochs reached without a stop

    def __post_init__(self) -> None:
        if self.monitor not in MONITORS:
            raise ValueError(f"monitor must be one of {sorted(MONITORS)}, got {self.monitor!r}")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience!r}")

    @property
    def logger_key(self) -> str:
        return MONITORS[self.monitor][0]

    def improves(self, value: float) -> bool:
        if value is None or math.isnan(value):
            return False
        if self.best is None:
            return True
        return value < self.best if MONITORS[self.monitor][1] == "min" else value > self.best

    def update(self, value: float, epoch: int) -> bool:
        """Record the value after completed epoch ``epoch``; True when it is a new best."""
        if epoch <= self.last_epoch:
            raise ValueError(f"epoch {epoch} was recorded already (last {self.last_epoch})")
        self.last_epoch = epoch
        self.converged = None  # training again (e.g. --c with a larger num_epochs): decided at the end
        better = self.improves(value)
        if better:
            self.best, self.best_epoch = float(value), epoch
        return better

    @property
    def epochs_without_improvement(self) -> int:
        return self.last_epoch - (self.best_epoch or 0)

    def should_stop(self) -> bool:
        # "when a minimum loss was achieved": a run without any valid value (NaN throughout) never stops
        return self.best_epoch is not None and self.epochs_without_improvement >= self.patience

    def finish(self, epoch: int, *, stopped: bool) -> None:
        """The run ended after ``epoch``: by the rule (converged) or at ``num_epochs`` (not converged)."""
        self.stopped_epoch = epoch if stopped else None
        self.converged = stopped

    def state(self) -> dict:
        return {**asdict(self), "epochs_without_improvement": self.epochs_without_improvement}

    @classmethod
    def from_state(cls, state: dict) -> "EarlyStopping":
        return cls(**{k: state[k] for k in ("monitor", "patience", "best", "best_epoch", "last_epoch",
                                            "stopped_epoch", "converged") if k in state})


def best_follows_monitor(early_stopping: str) -> bool:
    """Whether ``checkpoint_best.pth`` must be written by the monitored quantity (setting ``early_stopping``)
    instead of nnU-Net's: nnU-Net's is the best by EMA pseudo-Dice already; ``none`` keeps nnU-Net's."""
    return early_stopping in MONITORS and MONITORS[early_stopping][0] != NNUNET_BEST_KEY


@dataclass(frozen=True)
class EpochEnd:
    """What :func:`end_of_epoch` decided: the new state, stop now, a new best, and the lines for the log."""

    state: dict
    stop: bool
    new_best: bool
    messages: tuple[str, ...]


def end_of_epoch(state: dict, logged: Callable[[str], float], epoch: int, num_epochs: int) -> EpochEnd:
    """Apply the rule after completed epoch ``epoch`` (1-based) of at most ``num_epochs``.

    ``state``: the rule's state so far (:meth:`EarlyStopping.state`; not changed); ``logged(key)``: the value
    nnU-Net's logger holds for ``key`` this epoch. The run ends converged when the rule fires, and not converged
    when ``num_epochs`` is reached without a stop.
    """
    rule = EarlyStopping.from_state(state)
    value = float(logged(rule.logger_key))
    new_best = rule.update(value, epoch)
    messages = [f"new best {rule.monitor} {value:.6g} (epoch {epoch})"] if new_best else []
    stop = rule.should_stop()
    if stop:
        rule.finish(epoch, stopped=True)
        messages.append(f"early stopping after epoch {epoch}: {rule.monitor} has not improved for {rule.patience} "
                        f"epochs (best {rule.best:.6g} at epoch {rule.best_epoch})")
    elif epoch >= num_epochs:
        rule.finish(epoch, stopped=False)
        messages.append(f"NOT CONVERGED: no early stop within num_epochs={num_epochs} ({rule.monitor} last improved "
                        f"at epoch {rule.best_epoch}, patience {rule.patience})")
    return EpochEnd(rule.state(), stop, new_best, tuple(messages))


def stopped_text(state: dict | None) -> str | None:
    """Why a run continued with ``--c`` has nothing left to train (it stopped early), or None."""
    if not state or state.get("stopped_epoch") is None:
        return None
    return f"this run stopped early after epoch {state['stopped_epoch']} ({state['monitor']}); nothing to continue"
