"""DiZO's projection phases and options, from its documented contract (plugins/dizo.py): every ``cycle`` steps
(never at step 0, never with cycle 0) ``iters`` ZO iterations of two passes (γ ± μu), then the final write with no
pass; the options outside their ranges are refused."""
from __future__ import annotations

import pytest

from zoedge_plugins.dizo import DiZO


@pytest.mark.parametrize("step,phases", [(0, 0), (3, 0), (4, 3 + 1), (8, 3 + 1)])
def test_phases_every_cycle_steps(step, phases):
    got = list(DiZO(cycle=4, iters=3).extra_phases(step))
    assert len(got) == phases
    if phases:
        assert [p.passes for p in got] == [2, 2, 2, 0]
        assert [p.j for p in got] == [0, 1, 2, None]


def test_cycle_zero_is_never():
    assert not any(list(DiZO(cycle=0).extra_phases(s)) for s in range(0, 200, 10))


@pytest.mark.parametrize("options", [dict(cycle=-1), dict(iters=0), dict(mu=0.0), dict(mu=-0.1), dict(tau=1.0),
                                     dict(tau=-0.1)])
def test_out_of_range_options_are_refused(options):
    with pytest.raises(ValueError, match=f"{next(iter(options))}="):
        DiZO(**options)


@pytest.mark.parametrize("options", [dict(cycle=0), dict(iters=1), dict(mu=1e-9), dict(tau=0.0), dict(tau=0.999)])
def test_edge_options_are_accepted(options):
    opt = DiZO(**options)
    assert all(getattr(opt, k) == v for k, v in options.items())
