"""The predict-time eval transform: the stored albumentations pipeline's exact values, faster."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest

from visionpipe.augment import EvalTransform, deserialize, serialize


def reference(t: A.Compose, img: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(t(image=img)["image"].transpose(2, 0, 1), dtype=np.float32)


@pytest.mark.parametrize("steps, fast", [
    ([A.Resize(32, 48), A.Normalize(mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3))], True),
    ([A.Normalize()], True),
    ([A.Normalize(mean=0.5, std=0.25)], True),  # one mean and std for every channel
    ([A.Resize(32, 32), A.Normalize(normalization="image")], False),  # per-image statistics: run as stored
    ([A.Resize(32, 32)], False),
])
def test_values_equal_the_stored_pipeline(steps, fast):
    stored = deserialize(serialize(A.Compose(steps)))  # as predict gets it from the model's metadata
    t = EvalTransform(stored)
    assert (t.lut is not None) == fast
    rng = np.random.default_rng(0)
    for shape in [(40, 60, 3), (32, 48, 3), (17, 9, 3)]:
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        out = t(img)
        assert out.dtype == np.float32 and out.shape[0] == 3  # on the fast path a CHW view of an HWC buffer
        assert np.array_equal(out, reference(stored, img))
