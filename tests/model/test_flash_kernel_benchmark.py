"""`benchmarks/flash_kernel.py` times versions of the kernel source and compares their bits."""

import os

import pytest

from benchmarks import flash_kernel
from cm3leon_jax.model import cpu_kernels


def test_a_version_is_a_name_and_an_existing_source():
    name, path = flash_kernel.parse_version(f"now={cpu_kernels._SOURCE}")
    assert name == "now" and os.path.samefile(path, cpu_kernels._SOURCE)
    for bad in ("no_equals", "=x.cc", "v=", "v=/no/such/cpu_kernels.cc"):
        with pytest.raises(SystemExit, match="flash_kernel.py"):
            flash_kernel.parse_version(bad)


def test_two_runs_of_one_source_time_both_passes_with_the_same_bits(tmp_path):
    cpu_kernels.build()  # the children find the cached library
    out = tmp_path / "result.json"
    result = flash_kernel.main([f"a={cpu_kernels._SOURCE}", f"b={cpu_kernels._SOURCE}",
                                "--shape=1,70,2,20", "--rounds=1", "--trials=1",
                                f"--json={out}"])
    for name in "ab":
        assert 0 < result[name]["forward_ms"]["median"]
        assert 0 < result[name]["forward_backward_ms"]["median"]
    assert '"b": "same bits"' in out.read_text()


def test_different_results_are_reported_with_their_largest_difference(tmp_path):
    import numpy as np
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    np.savez(a, out=np.zeros(3), dq=np.ones(2))
    np.savez(b, out=np.zeros(3), dq=np.array([1.0, 1.5]))
    assert flash_kernel.compare_bits(str(a), str(a)) == "same bits"
    assert flash_kernel.compare_bits(str(a), str(b)) == "max difference 0.5"
