"""Remote candidates outside the pinned addresses are dropped."""

from actors.ingress.ice import allowed_candidates


def test_pinned_peer_keeps_only_allowed_remote_candidates():
    offer = "\r\n".join([
        "v=0", "m=audio 9 UDP/TLS/RTP/SAVPF 111",
        "a=candidate:1 1 udp 2122260223 192.0.2.2 50000 typ host",
        "a=candidate:2 1 udp 2122260223 3f1c6a2e-0000-4000-8000-000000000000.local 50001 typ host",
        "a=candidate:3 1 udp 2122260223 127.0.0.1 50002 typ host",
        "a=end-of-candidates",
    ]) + "\r\n"
    kept = allowed_candidates(offer, ["127.0.0.1"])
    assert "127.0.0.1 50002" in kept and "192.0.2.2" not in kept and ".local" not in kept
    assert "a=end-of-candidates" in kept and kept.startswith("v=0")
    assert allowed_candidates(offer, None) == offer
