"""The expected time of a claim's detection runs (``reproduce/estimate.detection_seconds``)."""

from mocolab.config import build_config
from mocolab.reproduce.estimate import DETECTION_OVERHEAD_SECONDS, detection_seconds

DET = {"data": {"made_digits": True}, "fpn": False, "min_size": 64, "max_size": 64, "iterations": 100}


def _cfg(**detection):
    return build_config({"model": {"arch": "small_cnn"}, "eval": {"detection": {**DET, **detection}}})


def test_detection_time_grows_with_iterations_images_and_pixels():
    assert detection_seconds(build_config({})) == 0.0  # no eval.detection
    base = detection_seconds(_cfg()) - DETECTION_OVERHEAD_SECONDS
    assert detection_seconds(_cfg(iterations=200)) - DETECTION_OVERHEAD_SECONDS == 2 * base
    assert detection_seconds(_cfg(batch_size=4)) - DETECTION_OVERHEAD_SECONDS == 2 * base
    assert 1.2 * base < detection_seconds(_cfg(min_size=96, max_size=128)) - DETECTION_OVERHEAD_SECONDS < 3 * base
