"""PacedAudioTrack and EventAudioSink, without any network."""

import asyncio
import time

import numpy as np
import pytest

from actors.ingress.playout import PacedAudioTrack


def tone(rate: int, seconds: float, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (8000 * np.sin(2 * np.pi * hz * t)).astype(np.int16)


@pytest.mark.timeout(60)
def test_paced_track_timing_pts_silence_and_clear():
    async def main():
        track = PacedAudioTrack()
        track.write(tone(16000, 0.5))
        frames, due, released = [], [], []
        for _ in range(50):
            frame = await track.recv()
            released.append(time.time())
            frames.append(frame)
            due.append(track.time_of(frame.pts))
        # Paced in real time: each frame is due 20 ms after the one before (later, where a stalled
        # loop moved the schedule) and none leaves before it is due (1 ms for the clocks' rounding).
        # How late a busy machine lets one go is not this test's business.
        assert all(b - a >= 0.02 - 1e-6 for a, b in zip(due, due[1:])), np.diff(due)
        assert all(r >= d - 0.001 for r, d in zip(released, due)), max(d - r for r, d in zip(released, due))
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

    from actors.ingress.playout import OUT_RATE, EventAudioSink

    sink = EventAudioSink(24_000)
    sink.write(tone(16000, 0.2))
    sink.write(tone(16000, 0.2))
    data = np.frombuffer(base64.b64decode(sink.take()), "<i2")
    assert abs(len(data) - 9600) <= 48 and np.abs(data[200:9000]).max() > 7000
    assert sink.written == sink.position == sink.next_play_sample == int(0.4 * OUT_RATE)
    assert sink.take() == "" and sink.time_of(0) is None


def test_a_write_of_n_samples_queues_exactly_three_n_from_the_first():
    track = PacedAudioTrack()
    for _ in range(2):  # a fresh track, then one whose queue (and resampler) was cleared
        total = 0
        for n in [3200, 1, 160, 7, 3200]:
            start = track.next_play_sample
            track.write(tone(16000, 0.2)[:n])
            total += n
            assert track.next_play_sample == start + 3 * n
            assert track.written - track.position == 3 * total and track.queued_ms == pytest.approx(total / 16, abs=1e-9)
        track.clear()


RESAMPLER_DELAY = 48  # the 16 -> 48 kHz filter's delay (16 input samples): written audio is heard up to 1 ms past next_play_sample


class TrackSink:
    """A RealtimeSession's sink whose audio goes out on a real PacedAudioTrack."""

    max_event_bytes = 4096

    def __init__(self, track):
        self.audio_out = track
        self.events = []

    def send(self, event):
        self.events.append(event)

    def append_audio(self, audio_b64, rate, t_arrival): ...
    def clear_input(self): ...
    def audio_written(self, response_id, item_id): ...
    def playout_started(self, response_id): ...
    def playout_done(self, response_id): ...
    def playout_cleared(self, response_id): ...


def onset(stream: np.ndarray, audio: np.ndarray, after: int = 0) -> int:
    """Where in `stream` (48 kHz) the 16 kHz `audio` begins, not before `after`: the shift that
    best matches it resampled by a fresh resampler (which starts its output on its first sample)."""
    import av

    from actors.ingress.audio_frames import resample_all, to_av_frame

    ref = resample_all(av.AudioResampler(format="s16", layout="mono", rate=48000), to_av_frame(audio, 16000))[200:2000].astype(np.int64)
    first = after + int(np.flatnonzero(np.abs(stream[after:]) > 1000)[0])
    shifts = np.arange(max(after, first - 200), first + 200)
    errors = [np.abs(stream[s + 200 : s + 2000].astype(np.int64) - ref).sum() for s in shifts]
    assert min(errors) <= len(ref), "the audio is not in the stream (as written)"  # within 1 LSB a sample
    return int(shifts[int(np.argmin(errors))])


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    "margin_ms, now_after_due_ms, queued_ms",
    [(50, 7, 0), (60, -30, 0), (60, 25, 0), (13, 19, 0), (40, 5, 7), (20, -3, 100)],
)
def test_a_response_starts_on_the_first_frame_due_at_least_the_margin_from_now(margin_ms, now_after_due_ms, queued_ms):
    from actors.ingress.playout import OUT_SAMPLES
    from actors.ingress.realtime_session import RealtimeSession
    from protocols import OutputChunk

    speech = np.random.default_rng(0).integers(-8000, 8000, 3200).astype(np.int16)  # no period to mistake a shift for

    async def main():
        track = PacedAudioTrack()
        frames = [await track.recv()]  # the track is live: frame n is due at start + n * 20 ms
        if queued_ms:
            track.write(tone(16000, queued_ms / 1000, 300))  # the end of an earlier response, still queued
        start = track.next_play_sample
        now = track.time_of(start) + now_after_due_ms / 1000
        session = RealtimeSession(TrackSink(track), {"type": "realtime"}, prebuffer_ms=margin_ms)
        assert session.responses.prebuffer() == margin_ms
        session.deliver(OutputChunk(session.id, 0, 0.0, speech, controls=["speak"]), now)
        expected = -(-start // OUT_SAMPLES) * OUT_SAMPLES  # the first frame boundary at or after start ...
        while track.time_of(expected) < now + margin_ms / 1000:  # ... due at least the margin from now
            expected += OUT_SAMPLES
        while track.queued_ms:  # play it all out
            frames.append(await track.recv())
        track.stop()
        assert [f.pts for f in frames] == [i * OUT_SAMPLES for i in range(len(frames))]
        stream = np.concatenate([f.to_ndarray().reshape(-1) for f in frames])
        begins = onset(stream, speech, after=start + RESAMPLER_DELAY)  # past the earlier response
        assert expected <= begins <= expected + RESAMPLER_DELAY
        assert not stream[start + 2 * RESAMPLER_DELAY : expected].any()  # silence up to that frame, past any earlier audio's filter tail

    asyncio.run(main())
