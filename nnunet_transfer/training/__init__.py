"""Run mechanics every trainer shares, each a module testable without a trainer.

* :mod:`.pretrained`: the ``-pretrained_weights`` check before any folder exists, and detection of a load
  from the weights themselves (fingerprint of the fresh network vs after the load);
* :mod:`.heads`: which segmentation-head rows come from the checkpoint, and copying them;
* :mod:`.checkpoint_state`: the ``"nnunet_transfer"`` entry of every checkpoint and the ``--c`` checks;
* :mod:`.snapshots`: start weights and weights-only snapshots; :mod:`.drift`: how far the parts moved;
* :mod:`.not_transferred`: which parameters did not come from the source, how they train, the log line;
* :mod:`.schedule`: optimizer and LR schedule; :mod:`.stopping`: early stopping, epoch by epoch;
* :mod:`.run_record`: ``transfer_config.json``, the parameter counts and the log lines of a run.

What a *strategy* decides (what trains, L2-SP, LoRA, stages) lives in :mod:`nnunet_transfer.policies`.
"""
