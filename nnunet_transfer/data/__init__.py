"""Generated datasets for tests and the demo."""
from nnunet_transfer.data.synthetic import (LABELS, SOURCE, TARGET, Domain, make_case, make_dataset,
                                            make_transfer_pair)

__all__ = ["Domain", "SOURCE", "TARGET", "LABELS", "make_case", "make_dataset", "make_transfer_pair"]
