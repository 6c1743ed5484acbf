"""PacedAudioTrack and EventAudioSink, without any network."""

import asyncio
import time

import numpy as np
import pytest

from actors.playout import PacedAudioTrack


def tone(rate: int, seconds: float, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (8000 * np.sin(2 * np.pi * hz * t)).astype(np.int16)


@pytest.mark.timeout(10)
def test_paced_track_timing_pts_silence_and_clear():
    async def main():
        track = PacedAudioTrack()
        track.write(tone(16000, 0.5))
        t0 = time.perf_counter()
        frames = [await track.recv() for _ in range(50)]
        elapsed = time.perf_counter() - t0
        assert 0.8 < elapsed < 1.5  # 50 frames of 20 ms, paced in real time
        assert [f.pts for f in frames] == [i * 960 for i in range(50)]
        assert all(f.sample_rate == 48000 and f.samples == 960 and f.layout.name == "mono" for f in frames)
        pcm = [f.to_ndarray().reshape(-1) for f in frames]
        assert np.abs(pcm[10]).max() > 7000 and not pcm[30].any()  # tone for 0.5 s, then silence
        assert abs(track.played_ms - 500) < 2 and track.queued_ms < 2
        track.write(tone(16000, 1.0))
        await track.recv()
        dropped = track.clear()
        assert 970 < dropped < 990 and track.queued_ms == 0
        assert not (await track.recv()).to_ndarray().any()
        track.stop()

    asyncio.run(main())


def test_event_sink_resamples_to_the_session_rate():
    import base64

    from actors.playout import OUT_RATE, EventAudioSink

    sink = EventAudioSink(24_000)
    sink.write(tone(16000, 0.2))
    sink.write(tone(16000, 0.2))
    data = np.frombuffer(base64.b64decode(sink.take()), "<i2")
    assert abs(len(data) - 9600) <= 48 and np.abs(data[200:9000]).max() > 7000
    assert sink.written == sink.position == sink.next_play_sample == int(0.4 * OUT_RATE)
    assert sink.take() == "" and sink.time_of(0) is None
