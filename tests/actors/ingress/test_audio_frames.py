"""Frame conversion between PyAV frames and int16 samples."""

import av
import numpy as np

from actors.ingress.audio_frames import frame_to_samples, resample_all, to_av_frame


def test_a_packed_stereo_frame_becomes_samples_by_channel():
    x = np.arange(960, dtype=np.int16)
    frame = av.AudioFrame.from_ndarray(np.stack([x, -x], axis=1).reshape(1, -1), format="s16", layout="stereo")
    frame.sample_rate = 48000
    samples, rate = frame_to_samples(frame)
    assert rate == 48000 and samples.dtype == np.int16 and samples.shape == (960, 2)
    assert (samples[:, 0] == x).all() and (samples[:, 1] == -x).all()


def test_a_planar_float_frame_is_scaled_to_int16():
    frame = av.AudioFrame.from_ndarray(np.array([[0.5, -0.5, 1.0]], np.float32), format="fltp", layout="mono")
    frame.sample_rate = 16000
    samples, _ = frame_to_samples(frame)
    assert samples.reshape(-1).tolist() == [16383, -16383, 32767]


def test_resampling_a_frame_and_flushing_gives_all_of_it():
    resampler = av.AudioResampler(format="s16", layout="mono", rate=16000)
    out = resample_all(resampler, to_av_frame(np.ones(4800, np.int16), 48000))
    rest = resample_all(resampler, None)
    assert len(out) + len(rest) == 1600 and rest.dtype == np.int16
