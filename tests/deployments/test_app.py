"""End to end over loopback: real Ray, Serve, aiortc peers, the openai library, the session log.

Audio checks look at content, not length: the caller's paced track pads with silence whenever no
output comes, so what must hold is that the model's audio (as logged) reached the caller. Counts
are compared with what the same call logged, not with wall-clock time: the suite shares two cores
with a Ray cluster, so a tick may be late, or shed by an actor that fell behind (and counted).
"""

import asyncio
import base64
import json
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import ray

from examples.call import FRAME, RATE, read_wav, resample
from examples.call import call as call_once
from protocols import InputChunk, OutputChunk, from_table
from tests.conftest import API_KEY
from tests.waits import TIMEOUT_S, wait_for

LOUD = 200  # RMS (int16) above which a 200 ms window holds sound, not padding


def run(coro):
    return asyncio.run(coro)


async def call(*args, **kwargs):
    """`examples.call.call`, again while the app answers 503 "capacity" (an interaction actor on a
    busy machine refuses new sessions while its steps run hot), as a client does after its Retry-After."""
    give_up = time.monotonic() + TIMEOUT_S
    while True:
        try:
            return await call_once(*args, **kwargs)
        except RuntimeError as exc:
            if "HTTP 503" not in str(exc) or time.monotonic() > give_up:
                raise
            await asyncio.sleep(1.0)  # its Retry-After


def post(url, body=b"", headers=None):
    request = urllib.request.Request(url, data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def stats(handle):
    return ray.get(handle.stats.remote())


def log_of(app, report):
    """The call's session log, read with the token the call was given."""
    token = report.events[0]["session"]["interplay"]["log_token"]
    return from_table(ray.get(app.log.read.remote(report.session_id, token)))


def loud_windows(audio: np.ndarray, rate: int) -> int:
    n = rate // 5
    windows = audio[: len(audio) // n * n].astype(np.float64).reshape(-1, n)
    return int((np.sqrt((windows**2).mean(axis=1)) > LOUD).sum())


def spoken_ticks(deltas, seqs: set[int] | None = None) -> int:
    """Outputs that hold sound (of `seqs` only, when given)."""
    return sum(1 for d in deltas if isinstance(d, OutputChunk) and (seqs is None or d.seq in seqs) and np.sqrt((d.audio.astype(np.float64) ** 2).mean()) > LOUD)


PLAYED_S = 0.5  # an output delivered this long before the caller's last packet has been played to it


def delivered(report) -> set[int]:
    """The ticks whose output reached the caller while its audio track played: their
    `interplay.tick` event, sent with the audio, arrived after its first packet and `PLAYED_S`
    before its last."""
    first, last = report.packets[0][0], report.packets[-1][0]
    return {t["tick"] for t in report.ticks if first <= t["received_at"] <= last - PLAYED_S}


def shed_ticks(app) -> int:
    """Ticks the interaction actors have shed so far (not stepped for anyone: they fell behind)."""
    return sum(ray.get(actor.stats.remote()).totals["shed_ticks"] for actor in app.interactions.values())


def assert_stepped_every_tick(deltas, shed: int) -> list[int]:
    """The session got an input and an output for every tick from its first to its last, in
    order, but those its actor shed (at most `shed`); its output seqs."""
    in_seqs = [d.seq for d in deltas if isinstance(d, InputChunk)]
    out_seqs = [d.seq for d in deltas if isinstance(d, OutputChunk)]
    assert in_seqs == out_seqs == sorted(set(out_seqs)) and out_seqs, (in_seqs, out_seqs)
    assert out_seqs[-1] - out_seqs[0] + 1 - len(out_seqs) <= shed, (out_seqs, shed)
    return out_seqs


def assert_continuous(report):
    """No hole in what the caller received: every 20 ms frame of the paced track came (RTP
    timestamps one frame apart), silence where there was no output."""
    stamps = [ts for _, ts in report.packets]
    assert len(stamps) > 10 and all((b - a) & 0xFFFFFFFF == FRAME for a, b in zip(stamps, stamps[1:])), stamps[:50]


def assert_the_model_was_heard(app, report):
    """The model spoke (its logged outputs) and the caller heard about as much of it as was
    delivered before it hung up: if output stopped reaching the caller, the padding would be
    silence and this fails. (What the model said after the caller left is logged, never heard: on
    a loaded machine the delivery lags, so that tail is not counted.)"""
    deltas = log_of(app, report)
    assert spoken_ticks(deltas) >= 5, "the model was asked for a response and said nothing"
    spoken = spoken_ticks(deltas, delivered(report))
    assert loud_windows(report.audio, RATE) >= 0.7 * spoken, (loud_windows(report.audio, RATE), spoken, spoken_ticks(deltas))
    return deltas


def test_a_call_gets_continuous_audio_back_for_its_whole_input(app, app_url, speech_wav):
    samples, rate = read_wav(speech_wav)
    seconds = len(samples) / rate
    shed = shed_ticks(app)
    report = run(call(app_url, samples, rate, api_key=API_KEY, tail_s=1.0, send_events=[{"type": "response.create"}]))
    assert_continuous(report)  # paced 20 ms frames, no holes
    assert report.event_types().get("session.created") == 1 and report.event_types().get("response.created", 0) >= 1
    assert report.ticks and all(t["step_ms"] > 0 for t in report.ticks)
    # the call ended: its slot is free (the ingress lets it go, then the interaction actor, through the router) and its log is whole
    wait_for(lambda: not (stats(app.ingress)["sessions"] or stats(app.interaction).sessions), interval=0.2)
    deltas = assert_the_model_was_heard(app, report)
    out_seqs = assert_stepped_every_tick(deltas, shed_ticks(app) - shed)  # every tick, in order
    assert out_seqs[-1] - out_seqs[0] + 1 >= seconds / app.clock.tick_s  # for as long as the caller talked
    assert len({t["tick"] for t in report.ticks}) >= len(out_seqs) / 2  # and the caller was sent them
    # the caller's speech reached the model, not silence: most of the 200 ms windows that hold speech in the file
    windows = resample(samples, rate, 16_000)
    windows = windows[: len(windows) // 3200 * 3200].reshape(-1, 3200)
    spoken = int((np.abs(windows).max(axis=1) > 1000).sum())
    speech = sum(1 for d in deltas if isinstance(d, InputChunk) and not d.missing and np.abs(d.audio).max() > 1000)
    assert speech >= spoken / 2, (speech, spoken)
    with pytest.raises(Exception, match="forbidden"):
        ray.get(app.log.read.remote(report.session_id, "not-the-token"))


def test_events_flow_both_ways_and_a_bad_event_does_not_end_the_call(app, app_url, speech_wav):
    samples, rate = read_wav(speech_wav)
    events = [
        {"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi there"}]}},
        {"type": "response.explode"},
        {"type": "conversation.item.truncate", "item_id": "nope", "content_index": 0, "audio_end_ms": 10},
    ]
    report = run(call(app_url, samples, rate, api_key=API_KEY, tail_s=1.0, send_events=events))
    types = report.event_types()
    assert types.get("conversation.item.added", 0) >= 1 and types.get("session.updated") == 1
    codes = [e["error"]["code"] for e in report.events if e["type"] == "error"]
    assert "unknown_event" in codes and "item_not_found" in codes
    out_seqs = [d.seq for d in log_of(app, report) if isinstance(d, OutputChunk)]
    assert len(out_seqs) >= len(samples) / rate / app.clock.tick_s  # the call went on: an output every tick


def test_four_concurrent_calls_all_progress_and_a_quiet_client_stalls_nobody(app, app_url, speech_wav):
    """Three callers talk through the file; the fourth goes quiet after 0.6 s and stays on the call.

    Checked tick by tick from the four logs (every actor counts the same ticks, on one clock), not
    as counts against wall-clock time. A tick is gathered at its deadline at the latest, with a
    missing chunk flagged for a caller whose audio is not in; had the ingress held a tick for the
    quiet caller, that tick's exchange would reach the actor after the step and every chunk in it
    would be missing. On a loaded machine some exchanges are late too (and some chunks of the
    talking callers, and the ticks around joining and leaving are the actor's own, flagged
    missing without an exchange), but a held tick would be every tick of the quiet stretch."""
    samples, rate = read_wav(speech_wav)
    missing_before = stats(app.ingress)["missing_chunks"]  # the ingress notices a caller gone quiet
    shed = shed_ticks(app)
    respond = [{"type": "response.create"}]

    async def four():
        return await asyncio.gather(
            call(app_url, samples, rate, api_key=API_KEY, tail_s=1.0, send_events=respond),
            call(app_url, samples, rate, api_key=API_KEY, tail_s=1.0, send_events=respond),
            call(app_url, samples, rate, api_key=API_KEY, tail_s=1.0, send_events=respond),
            call(app_url, samples, rate, api_key=API_KEY, tail_s=1.0, send_events=respond, stop_sending_after_s=0.6),
        )

    reports = run(four())
    shed = shed_ticks(app) - shed
    logs = []
    for report in reports:  # every call progressed: stepped every tick, sent its outputs, heard the model
        assert_continuous(report)
        deltas = assert_the_model_was_heard(app, report)
        out_seqs = assert_stepped_every_tick(deltas, shed)
        assert len({t["tick"] for t in report.ticks}) >= len(out_seqs) / 2, (len(report.ticks), len(out_seqs))
        logs.append({d.seq: d for d in deltas if isinstance(d, InputChunk)})
    *talking, quiet = logs
    heard = lambda log: {k for k, c in log.items() if not c.missing}  # noqa: E731
    spoke = lambda log: {k for k, c in log.items() if not c.missing and np.abs(c.audio).max() > 1000}  # noqa: E731

    # The quiet caller went quiet while the others spoke on, and was stepped as missing every tick
    # from then on to the end of its call: never waited for. (On a busy machine its 0.6 s may
    # not have reached the model at all: then it was quiet throughout.)
    went_quiet = max(heard(quiet), default=min(quiet) - 1)
    assert any(any(k > went_quiet for k in spoke(log)) for log in talking), (went_quiet, [sorted(spoke(log)) for log in talking])
    silent = [k for k in quiet if k > went_quiet]
    assert silent and all(quiet[k].missing for k in silent)

    # Nobody was held for it: while the others were still on, most of its silent ticks reached the
    # actor with their audio in (a held tick would have none). Its chunks there were the ingress's
    # missing ones, in the exchange it was sent its outputs from, and the ingress counted them.
    still_on = [k for k in silent if k <= min(max(log) for log in talking)]
    carried = [k for k in still_on if any(k in heard(log) for log in talking)]
    assert len(carried) > len(still_on) / 2, (carried, still_on)
    flagged = {t["tick"] for t in reports[-1].ticks} & set(carried)
    assert stats(app.ingress)["missing_chunks"] - missing_before >= len(flagged)


def test_the_openai_librarys_realtime_client_works_over_the_websocket(app_url, speech_wav):
    from openai import AsyncOpenAI

    samples, rate = read_wav(speech_wav)
    pcm = resample(samples, rate, 24_000)

    async def session():
        client = AsyncOpenAI(base_url=f"{app_url}/v1", api_key=API_KEY)
        seen, audio = {}, []
        async with client.realtime.connect(model="interplay-tiny") as conn:
            await conn.session.update(session={"type": "realtime", "instructions": "be brief"})
            for i in range(0, len(pcm), 4800):
                await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i : i + 4800].tobytes()).decode())
            await conn.send({"type": "bogus.event"})
            await conn.response.create()

            def answered():  # a second or more of sound, and every event the checks below look for
                sound = loud_windows(np.concatenate(audio), 24_000) if audio else 0
                return sound >= 5 and all(seen.get(kind) for kind in ("session.created", "session.updated", "error", "response.created"))

            give_up = time.monotonic() + TIMEOUT_S
            while not answered() and time.monotonic() < give_up:
                try:
                    event = await asyncio.wait_for(conn.recv(), 1.0)
                except asyncio.TimeoutError:
                    continue
                seen[event.type] = seen.get(event.type, 0) + 1
                if event.type == "response.output_audio.delta":
                    audio.append(np.frombuffer(base64.b64decode(event.delta), np.int16))
        return seen, np.concatenate(audio) if audio else np.zeros(0, np.int16)

    seen, audio = run(session())
    assert seen.get("session.created") == 1 and seen.get("session.updated") == 1 and seen.get("error") == 1
    assert loud_windows(audio, 24_000) >= 5  # it answered: a second or more of sound in the 24 kHz deltas
    assert seen.get("response.created", 0) >= 1
    assert "output_audio_buffer.started" not in seen  # WebRTC-only events stay off the socket


def test_hostile_sdp_is_400_and_bad_keys_are_401(app_url):
    calls = f"{app_url}/v1/realtime/calls"
    auth = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/sdp"}
    assert post(calls, b"hello", auth)[0] == 400
    assert post(calls, b"v=0\r\n" + b"a=x\r\n" * 20000, auth)[0] == 413  # oversized: too large to read
    two_audio = b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
    status, body = post(calls, two_audio, auth)
    assert status == 400 and json.loads(body)["error"]["code"] == "invalid_sdp"
    assert post(calls, b"v=0", {"Content-Type": "application/sdp"})[0] == 401
    assert post(calls, b"v=0", {"Authorization": "Bearer sk-wrong", "Content-Type": "application/sdp"})[0] == 401
    # a browser's short-lived secret works where a key does; a secret cannot mint more secrets
    status, body = post(f"{app_url}/v1/realtime/client_secrets", b"{}", {"Authorization": f"Bearer {API_KEY}"})
    secret = json.loads(body)["value"]
    assert status == 200 and secret.startswith("ek_")
    status, body = post(calls, b"hello", {"Authorization": f"Bearer {secret}", "Content-Type": "application/sdp"})
    assert status == 400, body  # past auth
    assert post(f"{app_url}/v1/realtime/client_secrets", b"{}", {"Authorization": f"Bearer {secret}"})[0] == 401


def test_websocket_without_a_key_is_refused(app_url):
    import websockets

    async def connect():
        async with websockets.connect(app_url.replace("http", "ws") + "/v1/realtime"):
            pass

    with pytest.raises(Exception) as info:
        run(connect())
    assert "401" in str(info.value) or "1008" in str(info.value) or "403" in str(info.value)


def test_health_and_metrics(app_url):
    with urllib.request.urlopen(f"{app_url}/healthz", timeout=10) as response:
        assert json.loads(response.read())["status"] == "ok"
    with urllib.request.urlopen(f"{app_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert "interplay_step_ms" in text and "interplay_ingress_calls" in text


def test_video_sent_alongside_reaches_the_model_as_frames(app, app_url, speech_wav, tmp_path):
    import av

    path = str(tmp_path / "clip.mp4")  # 4 s of a moving gradient, 320x240 at 10 fps
    with av.open(path, "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for i in range(40):
            img = np.zeros((240, 320, 3), np.uint8)
            img[:, :, 0] = (np.arange(320) + 8 * i) % 256
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    samples, rate = read_wav(speech_wav)
    report = run(call(app_url, samples, rate, api_key=API_KEY, tail_s=0.5, video=path))
    token = report.events[0]["session"]["interplay"]["log_token"]
    table = ray.get(app.log.read.remote(report.session_id, token))
    shapes = {(h, w) for h, w in zip(table.column("frame_h").to_pylist(), table.column("frame_w").to_pylist()) if h}
    assert shapes == {(160, 160)}  # centre-cropped and resized for the model
    assert sum(1 for h in table.column("frame_h").to_pylist() if h) >= 5


def test_a_second_build_on_the_same_cluster_refuses_while_the_first_runs(app):
    from deployments.app import StartupError, build, status

    changed = app.config.model_copy(update={"http": app.config.http.model_copy(update={"port": 8125})})
    with pytest.raises(StartupError, match="already running"):
        build(changed)
    assert stats(app.interaction).tick >= 0  # the running one is untouched
    parts = status()
    assert [parts[role] for role in ("session_log", "interaction", "ingress")] == ["alive"] * 3 and "running" in parts["http"].lower()


def test_a_drained_actor_takes_no_new_session_until_undrained(app):
    """`interplay drain interaction-0`: the router places nothing more there (its sessions, none
    here, would move to the others: tests/actors/test_router.py); `--undo` takes it back."""
    from deployments.app import drain, status

    placements = lambda: ray.get(app.router.placements.remote())  # noqa: E731
    assert drain("interaction-0") == {"moved": [], "failed": []}
    try:
        assert "draining" in status()["interaction-0"]
        placed = ray.get(app.router.place.remote("sess_drain_check"))
        assert placed.actor != "interaction-0" and placements()["sess_drain_check"] == placed.actor
        ray.get(app.router.leave.remote("sess_drain_check"))
    finally:
        drain("interaction-0", undo=True)
    assert "draining" not in status()["interaction-0"]
