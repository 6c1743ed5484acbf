"""AudioChunker, without any network."""

import av
import numpy as np

from actors.ingress.audio_chunker import AudioChunker
from protocols.clock import TickClock

T0 = 1000.0  # the interaction clock's t0 in these tests
CLOCK = TickClock(T0, 200)


def tone(rate: int, seconds: float, channels: int = 1, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    x = (8000 * np.sin(2 * np.pi * hz * t)).astype(np.int16)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def one_shot(x: np.ndarray, rate: int) -> np.ndarray:
    """The whole signal resampled to 16 kHz in one call (the reference for chunked output)."""
    r = av.AudioResampler(format="s16", layout="mono", rate=16000)
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x).reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = rate
    return np.concatenate([f.to_ndarray().reshape(-1) for f in [*r.resample(frame), *r.resample(None)]])


def feed(chunker: AudioChunker, x: np.ndarray, rate: int, frame_s: float = 0.02, start: float = T0):
    """Push x in real-time-sized frames, each stamped with the wall time its last sample ends."""
    n = int(rate * frame_s)
    for i in range(0, len(x), n):
        block = x[i : i + n]
        chunker.push(block, rate, start + (i + len(block)) / rate)


def test_chunker_48k_stereo_matches_one_shot():
    x = tone(48000, 1.0, channels=2)
    chunker = AudioChunker(CLOCK, jitter_ms=0)
    feed(chunker, x, 48000)
    chunks = chunker.pop_ready()
    assert [seq for seq, _ in chunks] == [0, 1, 2, 3, 4]
    assert all(a.dtype == np.int16 and a.shape == (3200,) for _, a in chunks)
    got = np.concatenate([a for _, a in chunks])
    assert not got[:16].any()  # placed 1 ms late: the resampler's delay
    ref = one_shot(x[:, 0], 48000)
    assert np.abs(got[16:].astype(int) - ref[: len(got) - 16]).max() <= 1


def test_chunker_24k_mono_and_alignment_padding():
    x = tone(24000, 0.5)
    chunker = AudioChunker(CLOCK, jitter_ms=40)
    feed(chunker, x, 24000, start=T0 + 0.05)  # joins 50 ms into tick 0; placed 40-60 ms later
    chunks = chunker.pop_ready()
    assert [seq for seq, _ in chunks] == [0, 1, 2]
    first = chunks[0][1]
    assert not first[:1600].any()  # 100 ms of leading silence: blocks end on the 20 ms grid
    assert np.abs(first[1660:]).max() > 7000
    got = np.concatenate([a for _, a in chunks])[1600:]
    ref = one_shot(x, 24000)
    errors = [np.abs(got[d:].astype(int) - ref[: len(got) - d]).max() for d in range(32)]  # up to 2 ms resampler delay
    assert min(errors) <= 1


def test_chunker_gap_then_resume_lands_at_arrival_tick():
    chunker = AudioChunker(CLOCK, jitter_ms=40)
    feed(chunker, tone(48000, 0.3), 48000)  # placed at 0.04-0.34 s: ticks 0 and part of 1
    feed(chunker, tone(48000, 0.2), 48000, start=T0 + 1.0)  # resumes: 1.04-1.24 s, ticks 5 and 6
    chunks = dict(chunker.pop_ready(until=6))
    assert sorted(chunks) == [0, 1, 5, 6]  # ticks 2-4 are not produced
    assert chunks[1][:2000].any() and not chunks[1][2300:].any()  # padded after the stall
    assert chunker.gaps == 1
    # a chunk handed out is final: audio later landing in its tick is dropped
    chunker.push(tone(48000, 0.02), 48000, T0 + 1.26)
    assert chunker.pop_ready(until=10) == []


def test_chunker_lost_packets_and_bursts_keep_their_place():
    x = tone(48000, 0.6)
    n = 960
    chunker = AudioChunker(CLOCK, jitter_ms=40)
    for k in range(len(x) // n):
        if k in (5, 6):
            continue  # lost in the network: the RTP timestamps (pts) jump
        arrival = T0 + (k + 1) * n / 48000
        if 10 <= k < 15:
            arrival = T0 + 15 * n / 48000 + 0.001  # a 100 ms hiccup, then a burst
        chunker.push(x[k * n : (k + 1) * n], 48000, arrival, pts=k * n)
    assert chunker.gaps == 0 and chunker.dropped_blocks == 0
    chunks = dict(chunker.pop_ready(until=3))
    got = np.concatenate([chunks[k] for k in sorted(chunks)])[640 + 16 :]  # jitter_s + resampler delay
    ref = one_shot(x, 48000)[:9000]
    got = got[: len(ref)]
    lost = slice(5 * 320 - 16, 7 * 320 + 16)
    assert np.abs(got[lost][32:-32]).max() < 50  # silence where the packets were lost
    keep = np.ones(len(got), bool)
    keep[lost] = False
    assert np.abs(got[keep].astype(int) - ref[keep]).max() <= 1  # everything else in its place


def test_chunker_resyncs_a_client_whose_clock_runs_slow():
    chunker = AudioChunker(CLOCK, jitter_ms=40)
    for k in range(120):  # 20 ms of audio every 21 ms
        chunker.push(np.full(320, 1000, np.int16), 16000, T0 + (k + 1) * 0.021)
    assert chunker.gaps == 1 and chunker.dropped_blocks == 0


def test_chunker_drops_audio_running_ahead_and_bounds_its_buffer():
    chunker = AudioChunker(CLOCK, max_ready=3)
    x = tone(16000, 2.0)
    chunker.push(x[:320], 16000, T0 + 0.02)
    chunker.push(x[320:], 16000, T0 + 0.04)  # 2 s of audio "arriving" in 20 ms
    assert chunker.dropped_blocks == 1
    feed(chunker, tone(16000, 1.0), 16000, start=T0 + 0.02)  # back in real time: 5 chunks, 3 kept
    assert len(chunker.pop_ready()) == 3 and chunker.dropped_chunks == 2


def test_chunker_follows_the_clocks_tick_length():
    clock = TickClock(T0, 100)
    chunker = AudioChunker(clock, jitter_ms=0)
    feed(chunker, tone(16000, 0.5), 16000)
    chunks = chunker.pop_ready()
    assert [seq for seq, _ in chunks] == [0, 1, 2, 3, 4]
    assert all(len(a) == clock.samples() == 1600 for _, a in chunks)


def speak(chunker: AudioChunker, pattern: list[tuple[str, float]], jitter_ms: float = 0.0, seed: int = 0, start: float = T0):
    """16 kHz 20 ms blocks, tone or silence by `pattern`, each arriving when its last sample was
    sent plus a random delay up to `jitter_ms` (in order, like packets). Returns what was sent."""
    rng = np.random.default_rng(seed)
    sent, arrival = [], start
    for kind, seconds in pattern:
        x = tone(16000, seconds, hz=300.0) if kind == "tone" else np.zeros(int(16000 * seconds), np.int16)
        for i in range(0, len(x), 320):
            n = len(sent) * 320
            arrival = max(arrival, start + (n + 320) / 16000 + rng.uniform(0, jitter_ms / 1000))
            chunker.push(x[i : i + 320], 16000, arrival, pts=n)
            sent.append(x[i : i + 320])
    return np.concatenate(sent)


def found_at(got: np.ndarray, part: np.ndarray, lo: int, hi: int) -> list[int]:
    """Where in got[lo:hi] `part` starts, whole and unchanged."""
    return [i for i in range(lo, hi) if np.array_equal(got[i : i + len(part)], part)]


def placed(chunker: AudioChunker, upto: int) -> np.ndarray:
    chunks = dict(chunker.pop_ready(until=upto))
    return np.concatenate([chunks.get(k, np.zeros(3200, np.int16)) for k in range(upto + 1)])


def test_margin_shrinks_for_a_steady_caller_at_a_pause_without_tearing():
    chunker = AudioChunker(CLOCK, jitter_ms=40)
    start = T0 + 0.015  # packets end 15 ms after the 20 ms grid: a 3-5 ms margin needs little aligning
    sent = speak(chunker, [("tone", 0.6), ("silence", 0.2), ("tone", 0.6)], jitter_ms=0.5, start=start)
    assert chunker.margin_ms <= 6 and chunker.moves >= 1
    got = placed(chunker, 8)
    # the first tone sits 40-60 ms after it was sent (aligned: 45), the second a few ms after
    assert found_at(got, sent[:9600], 960, 970)
    assert found_at(got, sent[12800:], 12800 + 240 + 50, 12800 + 240 + 100), "the second tone must be placed whole and contiguous"
    assert chunker.late_blocks <= 2 and chunker.gaps == 0 and chunker.dropped_blocks == 0


def test_margin_grows_for_a_jittery_caller():
    chunker = AudioChunker(CLOCK, jitter_ms=60)
    talk = [("tone", 0.4), ("silence", 0.1)] * 4
    speak(chunker, talk, jitter_ms=0.5, start=T0 + 0.015)
    steady = chunker.margin_ms
    late_before = chunker.late_blocks
    speak(chunker, talk * 2, jitter_ms=30, start=T0 + 2.0, seed=1)
    assert steady <= 6 and 22 <= chunker.margin_ms <= 60
    # once it has adapted (the window saw the jitter), at most a few blocks come after their place
    late_after = chunker.late_blocks - late_before
    late_again = chunker.late_blocks
    speak(chunker, talk * 2, jitter_ms=30, start=T0 + 6.0, seed=2)
    assert chunker.late_blocks - late_again <= 0.1 * 200, (late_after, chunker.late_blocks - late_again)
    assert chunker.gaps == 0 and chunker.dropped_blocks == 0


def test_margin_stays_put_while_audio_is_loud_and_is_capped():
    chunker = AudioChunker(CLOCK, jitter_ms=40)
    sent = speak(chunker, [("tone", 1.5)], jitter_ms=0.5)
    assert chunker.moves == 0  # no pause: the placement holds, the audio is untouched
    got = placed(chunker, 8)
    assert found_at(got, sent[:-320], 955, 965)  # 40 ms after its arrival, then to the next 20 ms grid point
    wild = AudioChunker(CLOCK, jitter_ms=20)
    speak(wild, [("tone", 0.2), ("silence", 0.2)] * 5, jitter_ms=80)
    assert wild.margin_ms <= 20 + 20 + 1  # the cap, and at most a block to align (a move to it waits for a pause)


def test_source_names_the_senders_last_sample_of_each_tick():
    chunker = AudioChunker(CLOCK, jitter_ms=0)
    speak(chunker, [("tone", 1.0)])
    src = chunker.source(1)
    assert src is not None and src["end"] == 2 * 3200 and abs(src["arrived"] - (T0 + 0.4)) < 1e-9
    assert chunker.source(20) is None
    late = AudioChunker(CLOCK, jitter_ms=10)  # 10 ms margin, then aligned: the next grid point, 20 ms
    speak(late, [("tone", 1.0)])
    src = late.source(1)
    assert src["end"] == 2 * 3200 - 320 and abs(src["arrived"] - (T0 + 0.38)) < 1e-9


def test_blocks_end_on_tick_boundaries_so_a_tick_is_complete_with_its_last_block():
    chunker = AudioChunker(CLOCK, jitter_ms=40)
    x = tone(48000, 2.0)
    done_at = {}
    for i in range(100):  # 20 ms blocks arriving 5 ms before the 20 ms grid
        arrival = T0 + 0.015 + (i + 1) * 0.02
        chunker.push(x[i * 960 : (i + 1) * 960] if i % 25 < 20 else np.zeros(960, np.int16), 48000, arrival, pts=i * 960)
        for seq, _ in chunker.pop_ready():
            done_at[seq] = arrival
    ends = {seq: T0 + (seq + 1) * 0.2 for seq in done_at}
    early = [ends[seq] - done_at[seq] for seq in sorted(done_at)]
    assert chunker.moves >= 1 and chunker.margin_ms <= 7  # 3 ms floor, aligned: 5 ms, and the resampler's 1 ms
    assert all(e > 0 for e in early)  # every chunk complete before its tick ends
    assert 0.003 <= early[-1] <= 0.007  # ... by the margin, not by up to a block more
    assert chunker.cut_short == 0
