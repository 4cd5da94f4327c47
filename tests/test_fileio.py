"""fileio: a result file is written whole or not at all."""
import pytest
import torch

from nnunet_transfer.fileio import atomic_path, save_atomic, write_atomic


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


def test_nested_atomic_paths_write_both_files_or_neither(tmp_path):
    """The inner file lands first and the outer only if it did; a failure inside leaves neither (weights adapt)."""
    outer, inner = tmp_path / "report.json", tmp_path / "weights.pth"
    with pytest.raises(RuntimeError, match="no space"):
        with atomic_path(outer) as tmp:
            tmp.write_text("{}")
            with atomic_path(inner) as tmp2:
                tmp2.write_bytes(b"half")
                raise RuntimeError("no space")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(outer) as tmp:
        tmp.write_text("{}")
        save_atomic(inner, {"a": 1})
    assert outer.read_text() == "{}" and torch.load(inner) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "weights.pth"]
