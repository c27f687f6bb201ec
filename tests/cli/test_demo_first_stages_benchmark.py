"""`benchmarks/demo_first_stages.py` refuses a corpus folder that is not there, before any
process starts (a run of it takes minutes; benchmarks/RESULTS_train.md has its figures)."""

import pytest

from benchmarks import demo_first_stages


def test_a_missing_corpus_folder_is_named_with_where_to_find_one(tmp_path):
    with pytest.raises(SystemExit, match="--corpus .*no_corpus.* is not a folder.*runs/demo/tfds"):
        demo_first_stages.main([f"--corpus={tmp_path / 'no_corpus'}"])
