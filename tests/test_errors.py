"""The one-line error helpers (`errors.py`) and the torch files they describe."""

import numpy as np
import pytest
import torch

from cm3leon_jax.errors import UserInputError, brief, check_count
from cm3leon_jax.export import chameleon_release
from cm3leon_jax.vocab import chameleon_vqgan_weights


def test_a_count_is_a_whole_number_at_least_its_least():
    for value, least in ((1, 1), (0, 0), (np.int64(3), 1)):
        check_count("x.n", value, least)
    for value in (0, -1, 2.5, True, "2", None):
        with pytest.raises(UserInputError, match=rf"^x\.n={value!r}: give a whole number >= 1"
                                                 r" \(4, not '4'\)\.$"):
            check_count("x.n", value, note=" (4, not '4')")


def test_a_long_foreign_message_is_cut_after_a_whole_sentence():
    long = RuntimeError("First part failed. " + "This goes on and on " * 20 + ". More.")
    assert brief(long) == "RuntimeError: First part failed."
    assert brief(ValueError("one\n  two")) == "ValueError: one two"
    assert brief(OSError("x" * 300)).endswith("x ...") and len(brief(OSError("x" * 300))) < 220


@pytest.fixture
def damaged_torch_file(tmp_path):
    torch.save({"quantize.embedding.weight": torch.zeros(64, 128)}, tmp_path / "whole.pth")
    data = (tmp_path / "whole.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    return str(tmp_path / "cut.pth")


def test_a_cut_short_torch_file_is_named_as_damaged_not_as_holding_objects(damaged_torch_file):
    """It was "holds more than tensors ... call with allow_pickle=True" (advice that does
    not help a damaged file), and in the release import torch's text cut mid-sentence."""
    for allow_pickle in (False, True):
        with pytest.raises(UserInputError, match=r"cut.pth': not a readable torch checkpoint "
                           r"\(\w+Error: .+\); write or download it again\.$"):
            chameleon_vqgan_weights.load_state_dict(damaged_torch_file, allow_pickle)
    with pytest.raises(chameleon_release.ReleaseError,
                       match=r"cut.pth: not a readable torch checkpoint \(\w+Error: .+\)\.$"):
        chameleon_release.load_torch(damaged_torch_file)


def test_a_torch_file_of_objects_is_refused_with_the_opt_in(tmp_path):
    torch.save({"weight": torch.zeros(2), "step": _Step()}, tmp_path / "objects.pth")
    with pytest.raises(UserInputError, match=r"holds more than tensors .*allow_pickle=True"):
        chameleon_vqgan_weights.load_state_dict(str(tmp_path / "objects.pth"))


class _Step:
    pass
