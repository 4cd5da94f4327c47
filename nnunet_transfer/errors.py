"""Typed errors. The command line turns every :class:`TransferError` into one line and exit code 2."""


class TransferError(Exception):
    """Base class of the errors this package raises for bad input or a broken environment."""


class ConfigError(TransferError, ValueError):
    """A setting has an unknown key, a wrong type or a value outside its valid range."""


class SpecError(TransferError, ValueError):
    """A block/layer spec does not parse or matches nothing in the network."""


class ArchitectureError(TransferError, TypeError):
    """The network is of an architecture a strategy does not support."""


class DataError(TransferError, FileNotFoundError):
    """A dataset, plans file, checkpoint or folder is missing or unusable."""
