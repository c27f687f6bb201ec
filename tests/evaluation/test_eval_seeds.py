"""benchmarks/eval_seeds.py: reports of several seeds merged into mean (min-max) cells."""

import json

import pytest

from benchmarks import eval_seeds


def _report(path, seed, objects, clip):
    rows = [{"task": "text_to_image", "strategy": "cfg3", "retrieved": 0,
             "objects_right": objects, "clip_score": clip},
            {"task": "vqa", "strategy": "greedy", "retrieved": 0, "vqa_exact_match": 0.5}]
    path.write_text(json.dumps({"seed": seed, "rows": rows}))
    return str(path)


def test_cells_are_the_mean_with_the_range_when_seeds_disagree(tmp_path, capsys):
    paths = [_report(tmp_path / "a.json", 0, 0.25, 30.0),
             _report(tmp_path / "b.json", 1, 0.75, 30.0)]
    out = eval_seeds.main(paths + ["--metrics=objects_right,clip_score,vqa_exact_match"])
    line = next(x for x in out.splitlines() if "cfg3" in x)
    assert "| 0.500 (0.250-0.750) | 30.000 |" in line  # Equal seeds: no range.
    assert "| vqa | greedy | 0 |  |  | 0.500 |" in out
    assert "2 reports (0, 1 seeds)" in capsys.readouterr().out


def test_a_missing_report_is_one_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        eval_seeds.main([str(tmp_path / "nope.json")])
