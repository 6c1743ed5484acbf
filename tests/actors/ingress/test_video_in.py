"""Frame resizing and the newest-frame sampler."""

import av
import numpy as np

from actors.ingress.video_in import FrameSampler, resize_frame


def test_resize_centre_crops_then_resizes():
    frame = np.zeros((480, 640, 3), dtype=np.uint8)
    frame[:, :80] = (255, 0, 0)  # left and right margins are cropped away
    frame[:, 560:] = (255, 0, 0)
    frame[:, 80:560] = (0, 0, 200)
    out = resize_frame(frame)
    assert out.shape == (160, 160, 3) and out.dtype == np.uint8
    assert (out == np.array([0, 0, 200], dtype=np.uint8)).all()
    assert resize_frame(np.full((80, 120, 3), 7, dtype=np.uint8)).shape == (160, 160, 3)  # upscaling too


def test_resize_frame_averages_when_shrinking():
    blocks = np.random.default_rng(0).integers(0, 256, (160, 160, 3), dtype=np.uint8)
    frame = blocks.repeat(2, axis=0).repeat(2, axis=1)  # 320x320, each 2x2 block one colour
    assert np.abs(resize_frame(frame, 160).astype(int) - blocks).max() <= 1

def test_frame_sampler_keeps_newest_once():
    sampler = FrameSampler(160)
    assert sampler.take() is None
    sampler.push(np.zeros((480, 640, 3), np.uint8))
    sampler.push(av.VideoFrame.from_ndarray(np.full((240, 320, 3), 200, np.uint8), format="rgb24"))
    frame = sampler.take()
    assert frame.shape == (160, 160, 3) and abs(int(frame.mean()) - 200) <= 2
    assert sampler.take() is None
