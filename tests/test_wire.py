"""Wire messages survive packing (no pickles: ints, floats and one float tensor)."""

import torch

from saguaro.ssd.wire import MESSAGES, Prefill, Ready, Respond, Retire, Shutdown, Speculations


def roundtrip(msg):
    ints, floats, tensor = msg.pack()
    assert all(isinstance(i, int) for i in ints) and all(isinstance(f, float) for f in floats)
    return MESSAGES[msg.kind].unpack(ints, floats, tensor)


def test_roundtrips():
    p = Prefill([3, 9], [[1, 2, 3], [4]], [0.0, 0.7], [1.0, 0.9], [0, 5], [None, 42])
    assert roundtrip(p) == p
    for fallback in ("neural", "ngram", "none"):
        r = Respond([None, (2, 17)], [[5], [6, 7, 8]], [3, 2, 1], fallback, lookup_min_match=3)
        assert roundtrip(r) == r
    assert roundtrip(Retire([0, 2])) == Retire([0, 2])
    assert roundtrip(Shutdown()) == Shutdown()
    assert roundtrip(Ready(4, 8192)) == Ready(4, 8192)
    q = torch.rand(1, 3, 5)
    s = roundtrip(Speculations([[1, 2, 3], [4, 5, 6]], [True, False], [1], q, 0.25, 0.125, [True, True]))
    assert s.tokens == [[1, 2, 3], [4, 5, 6]] and s.hits == [True, False] and s.sampled_rows == [1]
    assert s.lookups == [True, True]
    assert (s.tree_s, s.fallback_s) == (0.25, 0.125)
    assert torch.equal(s.q, q)


ECHO = """
import sys
from saguaro.ssd import wire
from saguaro.ssd.channel import WorkerEnd
channel = WorkerEnd("127.0.0.1", int(sys.argv[1]), 60).open("gloo")
while not isinstance(msg := wire.recv(channel), wire.Shutdown):
    wire.send(msg, channel)
channel.close()
"""


def test_messages_cross_processes_small_large_and_with_q():
    """Over a real private gloo pair: one-frame messages, ones that overflow the frame, and q."""
    import subprocess
    import sys

    from saguaro.ssd import wire
    from saguaro.ssd.channel import READY, EngineEnd

    end = EngineEnd()
    echo = subprocess.Popen([sys.executable, "-c", ECHO, str(end.port)])
    alive = lambda: None if echo.poll() is None else f"echo exited with {echo.returncode}"  # noqa: E731
    end.wait_for(READY, 60, alive)
    channel = end.open("gloo", timeout=60)
    try:
        big_prompt = list(range(3 * wire.FRAME))
        q = torch.rand(2, 3, 7, dtype=torch.float64)
        messages = [Respond([(1, 5)], [[9]], [2, 1, 1], "ngram"),
                    Prefill([0, 1], [big_prompt, [4]], [0.0, 0.5], [1.0, 1.0], [0, 0], [None, 3]),
                    Speculations([[1, 2, 3], [4, 5, 6]], [True, False], [0, 1], q, 0.5, 0.25)]
        for msg in messages:
            wire.send(msg, channel)
            back = wire.recv(channel)
            if isinstance(msg, Speculations):
                assert back.tokens == msg.tokens and back.sampled_rows == msg.sampled_rows
                assert (back.tree_s, back.fallback_s) == (0.5, 0.25) and torch.equal(back.q, q)
            else:
                assert back == msg
        wire.send(Shutdown(), channel)
        assert echo.wait(timeout=60) == 0
    finally:
        channel.close()
        if echo.poll() is None:
            echo.kill()


def test_channel_notices_an_exit_before_connecting_at_once():
    """A peer that exits before it reaches the store is seen by poll, not at a rendezvous timeout."""
    import subprocess
    import sys
    import time

    import pytest

    from saguaro.ssd.channel import HELLO, ChannelError, EngineEnd

    end = EngineEnd()
    child = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    t0 = time.monotonic()
    with pytest.raises(ChannelError, match="3"):
        end.wait_for(HELLO, 60, lambda: None if child.poll() is None else f"exited with {child.returncode}")
    assert time.monotonic() - t0 < 2


def test_hello_through_the_store_bytes():
    """The engine's settings travel as bytes in the store, before the channel exists (no pickle)."""
    import pytest

    from saguaro.ssd.wire import Hello, from_bytes, to_bytes

    hello = Hello(3, [4, 2, 1, 1], 49152, "bfloat16", 0.5, "ngram", "10.0.0.7")
    assert from_bytes(to_bytes(hello)) == hello
    assert from_bytes(to_bytes(Ready(4, 8192))) == Ready(4, 8192)
    with pytest.raises(ValueError, match="tensor"):
        to_bytes(Speculations([[1]], [True], [0], torch.rand(1, 1, 3)))
