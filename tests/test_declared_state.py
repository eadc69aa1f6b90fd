"""``plan`` counts the per-weight state a plugin declares (``ZOOptimizer.state_bytes`` over the stored tensors):
the plugin guide's momentum example declares one fp32 value per weight; MeZO declares none."""
from __future__ import annotations

from tests.test_sign_momentum import make
from zoedge_plugins.mezo import MeZO

TENSORS = [("layers.0.w", (4, 6)), ("layers.0.b", (6,)), ("embed", (10, 3))]


def test_momentum_state_is_four_bytes_per_weight():
    assert make(seed=0).state_bytes(TENSORS) == 4 * (24 + 6 + 30)


def test_mezo_declares_no_state():
    assert MeZO().state_bytes(TENSORS) == 0
