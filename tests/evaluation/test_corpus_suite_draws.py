"""The corpus suite draws each scene's examples in one order whatever tasks it keeps: a
suite of some tasks holds the full suite's examples, and the full suite's are as before."""

import hashlib
import json

import numpy as np

from cm3leon_jax.evaluation import suites

TASKS = ("text_to_image", "captioning", "vqa", "edit")


def _digest(suite: suites.Suite) -> str:
    parts = []
    for name in TASKS:
        task = getattr(suite, name)
        parts.append([name, task.prompts, task.references, task.ids,
                      [s.to_json() for s in task.scenes]])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def test_a_subset_of_tasks_holds_the_full_suites_examples():
    full = suites.corpus_suite(6)(32)
    # The full suite's examples, hashed before the draws were put in one order.
    assert _digest(full) == "9a0ef9cb1446a63461735f352c1f581de1261493aea45424d003a8c991ae2396"
    for name in TASKS:
        alone = getattr(suites.corpus_suite(6, tasks=[name])(32), name)
        want = getattr(full, name)
        assert alone.prompts == want.prompts and alone.references == want.references, name
        assert [s.to_json() for s in alone.scenes] == [s.to_json() for s in want.scenes], name
        np.testing.assert_array_equal(alone.images if name != "text_to_image"
                                      else alone.reference_images,
                                      want.images if name != "text_to_image"
                                      else want.reference_images)
    pair = suites.corpus_suite(6, tasks=["captioning", "edit"])(32)
    assert pair.vqa is None and pair.text_to_image is None
    assert pair.edit.prompts == full.edit.prompts
