"""The input-pipeline bench's processes: a failing pipeline is named, and no process outlives the bench."""

import multiprocessing

import pytest

from mocolab.bench.pipelines import pipeline_rows


def test_a_failing_pipeline_is_named_and_every_pipeline_process_ends():
    with pytest.raises(RuntimeError, match=r"input pipeline albumentations \(moco_v1\) failed: .*bench image"):
        pipeline_rows([b"not an image at all"], image_size=32, images=2, rounds=1)
    assert multiprocessing.active_children() == []
