"""The Ingress with real aiortc clients over the machine's own interfaces. A fake interaction side
implements the `protocols.ports.Interaction` port in process (the real InteractionActor plugs in
through the same port, wrapped in `Remote`); the Ray test binds a fake actor that way."""

import asyncio
import json
import time

import numpy as np
import pytest
import ray
from aiortc import RTCPeerConnection

from actors.ingress import receive_buffer
from actors.ingress.gatherer import COUNTS
from actors.ingress.ingress import Ingress, IngressActor
from actors.remote import Remote
from actors.ingress.transports import check_sdp
from protocols import OutputChunk, ProtocolError
from protocols.ports import Interaction
from protocols.seams import Joined
from tests.actors.ingress.peers import Client, Echo, call, now_clock
from tests.waits import TIMEOUT_S, until

pytestmark = pytest.mark.timeout(180)


def test_a_fresh_ingress_reports_every_counter():
    """Before any call is placed (no gatherer yet) the stats carry every counter, at zero."""

    async def main():
        ingress = Ingress(Echo(), now_clock())
        stats = await ingress.stats()
        assert {key: stats[key] for key in COUNTS} == dict.fromkeys(COUNTS, 0) and stats["sessions"] == 0
        await ingress.shutdown()

    asyncio.run(main())


def test_bad_sdp_is_refused():
    async def main():
        ingress = Ingress(Echo(), now_clock(), max_sessions=1)
        bad = [
            None,
            "hello",
            "v=0\r\n" + "a=x\r\n" * 20000,  # oversized
            "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n",  # no audio
            "v=0\r\n" + "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n" * 3,  # too many audio lines
            "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\n",  # no ICE/DTLS
            "v=0\r\nm=audio x\x00\r\n",
            "v=0\r\nm=audio 9 X 111\r\n" + "a=candidate:1 1 udp 1 10.0.0.1 9 typ host\r\n" * 40,
        ]
        for sdp in bad:
            with pytest.raises(ProtocolError) as info:
                await ingress.offer(sdp)
            assert info.value.code == "invalid_sdp"
        assert not ingress.sessions and ingress._negotiating == 0
        with pytest.raises(ProtocolError) as info:
            await ingress.offer(check_sdp("v=0\r\nm=audio 9 X 111\r\n"), session_config={"type": "nope"})
        assert info.value.code == "invalid_value"
        await ingress.shutdown()

    asyncio.run(main())


def test_a_call_that_never_connects_is_closed():
    async def main():
        ingress = Ingress(Echo(), now_clock(), max_sessions=1, connect_timeout_s=0.3)
        pc = RTCPeerConnection()
        pc.addTransceiver("audio")
        await pc.setLocalDescription(await pc.createOffer())
        offered = time.monotonic()
        await ingress.offer(pc.localDescription.sdp)  # and never takes the answer
        assert len(ingress.sessions) == 1
        await until(lambda: not ingress.sessions)
        assert time.monotonic() - offered >= 0.3  # closed at its timeout, not before
        await pc.close()
        await ingress.shutdown()

    asyncio.run(main())

def test_a_call_is_announced_with_its_session_and_log_token():
    async def main():
        async with call() as (_, client, _, sid):
            created = await client.wait_for("session.created")
            assert created["session"]["id"] == sid and created["session"]["interplay"]["log_token"] == f"token-{sid}"

    asyncio.run(main())


def test_a_calls_audio_goes_to_the_chunker_as_it_arrives():
    async def main():
        async with call() as (ingress, _, _, sid):
            receivers = ingress.sessions[sid].transport.pc.getReceivers()
            assert [type(getattr(r, receive_buffer._BUFFER)) for r in receivers if r.track.kind == "audio"] == [receive_buffer.ArrivalBuffer]

    asyncio.run(main())


def test_a_caller_hears_its_echo_continuously():
    async def main():
        async with call() as (_, client, _, _):
            loud = [np.abs(a).max() > 2000 for a in client.audio]
            assert np.mean(loud[loud.index(True) :]) > 0.8  # loose: a loaded machine may miss a tick

    asyncio.run(main())


def test_the_echo_comes_back_as_a_realtime_response():
    async def main():
        async with call() as (_, client, _, _):
            response = await client.wait_for("response.created")
            assert client.of_type("response.output_audio_transcript.delta")[0]["delta"] == "la "
            assert client.of_type("response.output_item.added")[0]["response_id"] == response["response"]["id"]

    asyncio.run(main())


def test_the_interaction_side_gets_each_tick_once_with_the_callers_audio_and_video():
    async def main():
        async with call(video=True) as (ingress, _, echo, _):

            async def exchanged():
                stats = await ingress.stats()
                return stats["exchanges"] >= 10 and stats

            stats = await until(exchanged)
            assert stats["sessions"] == 1 and stats["failed_exchanges"] == 0
            # consecutive ticks (but those the ingress skipped, and counted, when its loop stalled)
            seqs = [c.seq for c in echo.chunks]
            assert seqs == sorted(set(seqs)) and seqs[-1] - seqs[0] + 1 - len(seqs) <= (await ingress.stats())["skipped_ticks"]
            heard = [c for c in echo.chunks if not c.missing]
            assert all(c.audio.shape == (3200,) for c in echo.chunks) and np.abs(heard[-1].audio).max() > 6000
            frames = [c.frame for c in echo.chunks if c.frame is not None]
            assert len(frames) >= 3 and frames[-1].shape == (160, 160, 3) and abs(int(frames[-1].mean()) - 180) < 10

    asyncio.run(main())


def test_bad_events_on_a_call_get_errors_and_the_call_goes_on():
    async def main():
        async with call(max_event_bytes=4096) as (_, client, _, _):
            client.send("not json")
            client.send({"type": "no.such.event"})
            client.send({"type": "session.update", "session": {"audio": {"output": {"speed": 9}}}})
            client.send({"type": "x", "pad": "y" * 5000})  # oversized for this ingress
            client.send({"type": "session.update", "session": {"instructions": "be brief"}})
            updated = await client.wait_for("session.updated")
            assert updated["session"]["instructions"] == "be brief"
            assert [e["error"]["code"] for e in client.of_type("error")] == ["invalid_json", "unknown_event", "invalid_value", "message_too_large"]

    asyncio.run(main())


def test_typed_text_and_session_updates_reach_the_interaction_side():
    async def main():
        async with call() as (_, client, echo, _):
            client.send({"type": "session.update", "session": {"instructions": "be brief"}})
            client.send({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello there"}]}})
            await client.wait_for("session.updated")
            await client.wait_for("conversation.item.added")
            await until(lambda: "hello there" in "".join(c.text for c in echo.chunks))
            updates = await until(lambda: [e for c in echo.chunks for e in c.events if e["type"] == "session.update"])
            assert updates[0]["session"]["instructions"] == "be brief"  # forwarded as the client sent it

    asyncio.run(main())


def test_tick_events_trace_where_each_ticks_audio_came_from_and_went():
    async def main():
        async with call() as (_, client, _, _):
            client.send({"type": "session.update", "session": {"interplay": {"tick_events": True}}})
            tick = await client.wait_for("interplay.tick")
            assert tick["in"]["arrived"] <= tick["at"]["gathered"] <= tick["at"]["returned"] <= tick["at"]["written"]
            assert tick["in_level"] > 0.1 and tick["out_sample"] > 0

    asyncio.run(main())


def truncate(client, audio_end_ms: int) -> None:
    """Truncate the first response's item, which is still playing."""
    item_id = client.of_type("response.output_item.added")[0]["item"]["id"]
    client.send({"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0, "audio_end_ms": audio_end_ms})


def test_truncating_beyond_what_was_played_is_an_error():
    async def main():
        async with call() as (_, client, _, _):
            truncate(client, 600_000)
            error = await client.wait_for("error")
            assert error["error"]["param"] == "audio_end_ms" and not client.of_type("conversation.item.truncated")

    asyncio.run(main())


def test_truncating_within_what_was_played_cancels_the_response():
    async def main():
        async with call() as (_, client, _, _):
            truncate(client, 500)
            truncated = await client.wait_for("conversation.item.truncated")
            assert truncated["audio_end_ms"] == 500
            await client.wait_for("output_audio_buffer.cleared")
            done = await client.wait_for("response.done")
            assert done["response"]["status"] == "cancelled"

    asyncio.run(main())


def test_after_an_interruption_the_caller_hears_silence():
    async def main():
        async with call() as (_, client, _, _):
            truncate(client, 500)
            await client.wait_for("response.done")
            n_before = len(client.audio)
            await until(lambda: len(client.audio) - n_before > 30)  # the track keeps sending ...
            # ... but muted: the model still "speaks", the client hears silence (past the frames in flight)
            assert all(np.abs(a).max() < 500 for a in client.audio[n_before + 10 :])

    asyncio.run(main())


def test_while_muted_cancel_has_no_response_and_clear_is_still_answered():
    async def main():
        async with call() as (_, client, _, _):
            truncate(client, 500)
            await client.wait_for("response.done")
            client.send({"type": "response.cancel", "event_id": "ev1"})
            client.send({"type": "output_audio_buffer.clear"})
            await until(lambda: len(client.of_type("output_audio_buffer.cleared")) == 2 and client.of_type("error"))
            assert client.of_type("error")[-1]["error"] == {"type": "invalid_request_error", "code": "response_cancel_not_active", "message": "there is no active response to cancel", "event_id": "ev1"}

    asyncio.run(main())


def test_two_calls_share_each_tick_and_a_leaving_call_frees_its_slot():
    async def main():
        echo = Echo()
        ingress = Ingress(echo, now_clock(), max_sessions=2)
        closed = echo.left
        a, b = Client(), Client()
        sa, sb = await asyncio.gather(a.connect(ingress), b.connect(ingress))
        with pytest.raises(ProtocolError) as info:
            await Client().connect(ingress)
        assert info.value.code == "capacity"
        both = lambda: [ids for _, ids in echo.calls if len(ids) == 2]  # noqa: E731
        # both calls hear their echo
        await until(lambda: a.loud_frames() > 20 and b.loud_frames() > 20 and len(both()) >= 5, message=lambda: (a.loud_frames(), b.loud_frames(), len(both())))
        ticks = [tick for tick, _ in echo.calls]
        assert ticks == sorted(set(ticks))  # one exchange per tick, never one per session
        assert all(set(ids) == {sa, sb} for ids in both())

        await a.pc.close()  # hangs up mid-call
        await until(lambda: sa not in ingress.sessions, message="the closed call kept its slot")
        assert closed == [sa]
        n, exchanged = len(b.audio), len(echo.calls)
        await until(lambda: len(b.audio) - n > 15 and len(echo.calls) - exchanged >= 3)  # the other call goes on
        c = Client()
        sc = await c.connect(ingress)  # the freed slot takes a new call
        assert len(ingress.sessions) == 2
        await ingress.close(sc)  # the server hangs up (POST .../hangup)
        assert list(ingress.sessions) == [sb] and closed == [sa, sc]
        with pytest.raises(ProtocolError) as info:
            await ingress.close(sc)
        assert info.value.code == "unknown_session"
        for client in (b, c):
            await client.pc.close()
        await ingress.shutdown()

    asyncio.run(main())


def test_slow_or_failing_exchange_does_not_stall_ticks():
    class Flaky(Echo):
        """Fails every third exchange, hangs past the timeout on the next; counts how many ran at once."""

        running = most = 0

        async def exchange(self, tick, chunks, session_ids):
            self.running += 1
            self.most = max(self.most, self.running)
            try:
                if tick % 3 == 0:
                    raise RuntimeError("interaction side hiccup")
                if tick % 3 == 1:
                    await asyncio.sleep(5)  # a slow interaction side: past the timeout
                return self.outputs(chunks)
            finally:
                self.running -= 1

    async def main():
        flaky = Flaky()
        ingress = Ingress(flaky, now_clock(), exchange_timeout_s=0.5)
        client = Client()
        await client.connect(ingress)

        async def going_on():
            stats = await ingress.stats()
            return stats["exchanges"] >= 2 and stats["failed_exchanges"] >= 4 and stats["ticks"] >= 7

        await until(going_on)
        # the next tick was gathered while a slow exchange hung, instead of after it
        assert flaky.most >= 2
        await until(lambda: client.loud_frames() > 5 and len(client.audio) > 70)  # silence fills the gaps
        await client.pc.close()
        await ingress.shutdown()

    asyncio.run(main())


@ray.remote
class FakeInteraction:
    """The InteractionActor's surface the ingress uses: clock_info, join, leave, exchange."""

    def __init__(self, max_sessions: int):
        self.t0, self.max_sessions, self.members = time.time(), max_sessions, []

    def clock_info(self):
        return {"t0": self.t0, "tick_ms": 200, "tick_s": 0.2, "grace_s": 0.04}

    async def join(self, session_id, seed=None):
        if len(self.members) >= self.max_sessions:
            raise ProtocolError("the interaction actor is full", "capacity")
        self.members.append(session_id)
        return Joined(session_id, 0, "t", {})

    async def leave(self, session_id):
        self.members.remove(session_id)

    async def exchange(self, tick, chunks, session_ids):
        return [OutputChunk(c.session_id, c.seq, c.t_start, c.audio, controls=["speak"]) for c in chunks]

    def get_members(self):
        return self.members


@pytest.mark.timeout(180)
def test_ingress_inside_a_ray_actor(ray_cluster):
    async def main():
        interaction = FakeInteraction.remote(max_sessions=1)
        clock = await interaction.clock_info.remote()
        actor = IngressActor.remote(Remote(interaction, Interaction), clock, ice_addresses=["127.0.0.1"])
        with pytest.raises(ProtocolError) as info:  # what the HTTP layer maps to 400
            await actor.offer.remote("v=0\r\nm=audio 9 X 0\r\n")
        assert info.value.code == "invalid_sdp"
        client = Client()
        sid = await client.connect(_RayIngress(actor))
        await client.wait_for("session.created")
        with pytest.raises(ProtocolError) as info:  # refused by the interaction side's join
            await Client().connect(_RayIngress(actor))
        assert info.value.code == "capacity"

        async def echoed():  # the caller's audio reached the actor in chunks and came back
            stats = await actor.stats.remote()
            return client.loud_frames() > 20 and stats["exchanges"] >= 5 and stats["ticks"] - stats["missing_chunks"] >= 5

        await until(echoed)
        assert (await actor.stats.remote())["sessions"] == 1
        assert await interaction.get_members.remote() == [sid]
        await client.pc.close()

        async def left():
            return await interaction.get_members.remote() == []

        await until(left, message="the hung-up call kept its place on the interaction side")
        await actor.shutdown.remote()
        for handle in (actor, interaction):
            ray_cluster.kill(handle)

    asyncio.run(main())


class _RayIngress:
    def __init__(self, actor):
        self.actor = actor

    async def offer(self, sdp, session_config=None):
        return await self.actor.offer.remote(sdp, session_config)


def test_idle_and_overlong_sessions_end_with_an_error_event_and_free_their_slots():
    async def main():
        echo = Echo()
        idle = Ingress(echo, now_clock(), max_sessions=2, idle_timeout_s=0.5)
        sid, outbox = await idle.open_websocket()
        long = Ingress(echo, now_clock(), max_sessions=2, max_session_s=1.0)
        lid, loutbox = await long.open_websocket()
        give_up = time.monotonic() + TIMEOUT_S
        while (sid in idle.sessions or lid in long.sessions) and time.monotonic() < give_up:
            if lid in long.sessions:  # an active client (an event every 100 ms) still reaches the maximum length
                long.receive(lid, json.dumps({"type": "input_audio_buffer.clear"}))
            await asyncio.sleep(0.1)
        assert sid not in idle.sessions and lid not in long.sessions
        for box, word in ((outbox, "idle"), (loutbox, "maximum length")):
            events = []
            while not box.empty():
                item = box.get_nowait()
                if item:
                    events.append(json.loads(item))
            expired = [e for e in events if e["type"] == "error" and e["error"]["code"] == "session_expired"]
            assert len(expired) == 1 and word in expired[0]["error"]["message"]
        assert echo.left == [sid, lid] or sorted(echo.left) == sorted([sid, lid])
        await idle.shutdown()
        await long.shutdown()

    asyncio.run(main())
