"""The ``nnunet_transfer`` command line (:mod:`nnunet_transfer.cli.main`), one module per subcommand."""


def add_trust_argument(parser) -> None:
    """``--trust-checkpoint`` (:data:`nnunet_transfer.checkpoints.TRUST_FLAG`) on a command that reads checkpoints;
    :func:`nnunet_transfer.cli.main.main` runs the command inside ``trusting_checkpoints()`` when it is given."""
    parser.add_argument("--trust-checkpoint", dest="trust_checkpoint", action="store_true",
                        help="load the checkpoint files as nnU-Net does (torch.load weights_only=False), which runs "
                             "any code a file holds: only for files you trust (you or your lab wrote them). Without "
                             "it, a file that asks for anything but tensors, numbers, strings, containers and numpy "
                             "scalars is refused")
