from protocols.realtime_config import format_of


def test_formats_and_rates_of_a_session_config():
    assert format_of({}, "input") == ("audio/pcm", 24000)
    assert format_of({"audio": {"input": {"format": {"type": "audio/pcmu"}}}}, "input") == ("audio/pcmu", 8000)
    assert format_of({"audio": {"output": {"format": {"type": "audio/pcm", "rate": 16000}}}}, "output") == ("audio/pcm", 16000)
