"""TensorBoard writer: the similarity picture is a readable heatmap pair on one colour scale."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from dime_ds.log.tensorboard import TBWriter

PURPLE, YELLOW = np.array([68, 1, 84]), np.array([253, 231, 37])  # viridis at the scale's ends


def _images(log_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={IMAGES: 0})
    events.Reload()
    return events.Images(tag)


def _near(pixels: np.ndarray, colour: np.ndarray) -> int:
    return int((np.abs(pixels.astype(int) - colour).sum(axis=-1) < 30).sum())


def test_similarity_image_is_a_wide_colour_heatmap_pair_on_one_scale(tmp_path):
    tb = TBWriter(tmp_path / "tb", enabled=True)
    # All-0 teacher, all-1 student: on one scale the teacher is its lowest colour, the student its
    # highest (scaled apart, both would be one colour).
    tb.similarity_image("similarity/teacher_vs_student", torch.zeros(16, 16), torch.ones(16, 16), step=7)
    tb.close()
    (event,) = _images(tmp_path / "tb", "similarity/teacher_vs_student")
    assert event.step == 7 and event.width >= 300 and event.height >= 150
    picture = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
    assert picture.shape[:2] == (event.height, event.width)
    middle = picture[event.height // 2]
    left, right = middle[: event.width * 2 // 5], middle[event.width // 2: event.width * 4 // 5]
    assert _near(left, PURPLE) > 100 and _near(left, YELLOW) == 0
    assert _near(right, YELLOW) > 100 and _near(right, PURPLE) == 0


def test_a_disabled_writer_writes_nothing(tmp_path):
    tb = TBWriter(tmp_path / "tb", enabled=False)
    tb.similarity_image("s", torch.zeros(4, 4), torch.ones(4, 4), step=0)
    tb.scalars({"a": 1.0}, 0)
    tb.close()
    assert not (tmp_path / "tb").exists()
