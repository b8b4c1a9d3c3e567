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
import sys, datetime, torch.distributed as dist
from saguaro.ssd import wire
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[1]}", rank=1, world_size=2,
                        timeout=datetime.timedelta(seconds=60))
while not isinstance(msg := wire.recv(0), wire.Shutdown):
    wire.send(msg, 0)
dist.destroy_process_group()
"""


def test_messages_cross_processes_small_large_and_with_q():
    """Over a real gloo pair: one-frame messages, ones that overflow the frame, and q."""
    import datetime
    import subprocess
    import sys

    import torch.distributed as dist

    from saguaro.ssd import wire
    from saguaro.ssd.worker import free_port

    port = free_port()
    echo = subprocess.Popen([sys.executable, "-c", ECHO, str(port)])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        big_prompt = list(range(3 * wire.FRAME))
        q = torch.rand(2, 3, 7, dtype=torch.float64)
        messages = [Respond([(1, 5)], [[9]], [2, 1, 1], "ngram"),
                    Prefill([0, 1], [big_prompt, [4]], [0.0, 0.5], [1.0, 1.0], [0, 0], [None, 3]),
                    Speculations([[1, 2, 3], [4, 5, 6]], [True, False], [0, 1], q, 0.5, 0.25)]
        for msg in messages:
            wire.send(msg, 1)
            back = wire.recv(1)
            if isinstance(msg, Speculations):
                assert back.tokens == msg.tokens and back.sampled_rows == msg.sampled_rows
                assert (back.tree_s, back.fallback_s) == (0.5, 0.25) and torch.equal(back.q, q)
            else:
                assert back == msg
        wire.send(Shutdown(), 1)
        assert echo.wait(timeout=60) == 0
    finally:
        dist.destroy_process_group()
        if echo.poll() is None:
            echo.kill()
