"""The model's speech as Realtime responses: speaking runs, their margin, truncation and the
muting that follows an interruption; driven through a `RealtimeSession` alone."""

import pytest

from actors.ingress.responses import MAX_TRANSCRIPT_CHARS
from tests.actors.ingress.session_fakes import SILENCE, out, send, session


def speaking(s, sink) -> tuple[str, str]:
    """Two speaking chunks delivered: the response's id and its item's."""
    for seq, text in [(0, "hel"), (1, "lo")]:
        s.deliver(out(s, seq, ["speak"], text), 0.0)
    return sink.of_type("response.created")[0]["response"]["id"], sink.of_type("response.output_item.added")[0]["item"]["id"]


def truncate(s, item_id, audio_end_ms):
    send(s, {"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0, "audio_end_ms": audio_end_ms})


def test_a_speaking_run_is_one_response_queued_behind_its_margin():
    s, sink = session()
    rid, _ = speaking(s, sink)
    assert sink.playout == [("started", rid), ("written", rid), ("written", rid)]
    assert sink.audio_out.queued_ms == pytest.approx(460, abs=1)  # 60 ms margin + two chunks


def test_truncating_beyond_what_played_or_an_unknown_item_is_an_error():
    s, sink = session()
    _, item_id = speaking(s, sink)
    sink.audio_out.play(260)  # margin + 200 ms of the item played
    truncate(s, item_id, 300)
    assert sink.of_type("error")[-1]["error"]["param"] == "audio_end_ms"
    truncate(s, "nope", 0)
    assert sink.errors() == ["invalid_value", "item_not_found"]
    assert sink.of_type("conversation.item.truncated") == [] and sink.of_type("response.done") == []


def test_truncating_an_item_still_playing_cancels_its_response():
    s, sink = session()
    rid, item_id = speaking(s, sink)
    sink.audio_out.play(260)
    truncate(s, item_id, 150)
    assert sink.types()[-5:] == [
        "response.output_audio_transcript.done", "response.output_audio.done", "response.output_item.done", "response.done",
        "conversation.item.truncated",
    ]
    done = sink.of_type("response.done")[-1]["response"]
    assert done["status"] == "cancelled" and done["output"][0]["status"] == "incomplete"
    assert sink.of_type("conversation.item.truncated")[-1]["audio_end_ms"] == 150
    assert sink.playout[-1] == ("cleared", rid) and sink.audio_out.queued_ms == 0


def test_after_an_interruption_speech_is_muted_until_the_model_yields():
    s, sink = session()
    _, item_id = speaking(s, sink)
    sink.audio_out.play(260)
    truncate(s, item_id, 150)
    written = sink.audio_out.written
    n = len(sink.events)
    s.deliver(out(s, 2, ["speak"], "more"), 0.0)  # the model still speaks: nothing plays, no response starts
    assert sink.audio_out.written == written and len(sink.events) == n
    s.deliver(out(s, 3, ["yield"], audio=SILENCE), 0.0)
    s.deliver(out(s, 4, ["speak"], "again"), 0.0)
    assert len(sink.of_type("response.created")) == 2 and sink.audio_out.written > written
    s.deliver(out(s, 5, ["silent"], audio=SILENCE), 0.0)
    done = sink.of_type("response.done")[-1]["response"]
    assert done["status"] == "completed" and done["output"][0]["content"][0]["transcript"] == "again"
    assert sink.playout[-1] == ("done", done["id"])


def test_prebuffer_adapts_to_how_steadily_outputs_arrive():
    s, _ = session(prebuffer_ms=60.0)
    responses = s.responses
    assert responses.prebuffer() == 60.0  # no history yet: the configured margin
    responses.lateness.extend(0.030 + 0.004 * (i % 3) for i in range(20))  # steady: within 8 ms
    assert 10.0 <= responses.prebuffer() <= 20.0
    responses.lateness.extend([0.030, 0.200] * 20)  # erratic: capped at the configured margin
    assert responses.prebuffer() == 60.0


def test_transcripts_in_done_events_are_bounded():
    s, sink = session()
    for seq in range(40):
        s.deliver(out(s, seq, ["speak"], "w" * 1000), 0.0)
    s.deliver(out(s, 40, ["silent"], audio=SILENCE), 0.0)
    assert len(sink.of_type("response.output_audio_transcript.done")[0]["transcript"]) == MAX_TRANSCRIPT_CHARS
    assert len(sink.of_type("response.done")[0]["response"]["output"][0]["content"][0]["transcript"]) == MAX_TRANSCRIPT_CHARS
