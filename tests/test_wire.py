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
        r = Respond([None, (2, 17)], [[5], [6, 7, 8]], [3, 2, 1], fallback)
        assert roundtrip(r) == r
    assert roundtrip(Retire([0, 2])) == Retire([0, 2])
    assert roundtrip(Shutdown()) == Shutdown()
    assert roundtrip(Ready(4, 8192)) == Ready(4, 8192)
    q = torch.rand(1, 3, 5)
    s = roundtrip(Speculations([[1, 2, 3], [4, 5, 6]], [True, False], [1], q, 0.25, 0.125))
    assert s.tokens == [[1, 2, 3], [4, 5, 6]] and s.hits == [True, False] and s.sampled_rows == [1]
    assert (s.tree_s, s.fallback_s) == (0.25, 0.125)
    assert torch.equal(s.q, q)
