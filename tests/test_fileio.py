"""fileio: a result file is written whole or not at all."""
import pytest
import torch

from nnunet_transfer.fileio import save_atomic, write_atomic


def test_save_atomic_round_trips_and_leaves_no_temporary(tmp_path):
    path = save_atomic(tmp_path / "w.pth", {"network_weights": {"a": torch.arange(3.0)}})
    assert torch.equal(torch.load(path)["network_weights"]["a"], torch.arange(3.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pth"]


@pytest.mark.parametrize("write, bad", [(save_atomic, {"f": lambda: 0}), (write_atomic, object())])
def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path, write, bad):
    path = tmp_path / "out"
    path.write_bytes(b"old")
    with pytest.raises(Exception):
        write(path, bad)  # a lambda cannot be pickled; an object is not text
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
