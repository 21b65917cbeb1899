"""An agent's CPU for one private page, by the documented rule (docs/costs.md; issue 22's mutation survivors in
replay/migration/context.py ``Run.page_ns`` / ``target_page_ns``):

- packing at the source: `page_pack_ns` in metadata mode; in data mode `data_page_pack_ns`, plus
  `data_zstd_page_ns` when `data_zstd_level` > 0;
- taking it in at the target: unpacking (`page_unpack_ns`, data mode `data_page_unpack_ns`), PVALIDATE
  (`pvalidate_ns`) and, for an OS below VMPL0, RMPADJUST (`rmpadjust_ns`).

Costs that do not divide into each other, so that a sign or a missing term shows.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from replay.migration.context import Run
from replay.scenario.spec import make_scenario

COSTS = {"page_pack_ns": 503, "page_unpack_ns": 307, "data_page_pack_ns": 3301, "data_zstd_page_ns": 2017,
         "data_page_unpack_ns": 1303, "pvalidate_ns": 1009, "rmpadjust_ns": 211}


def _costs(os_vmpl=0, **migration):
    s = make_scenario(guest={"os_vmpl": os_vmpl}, trace={"file": "unused.arrow"}, migration=migration, costs=COSTS)
    run = SimpleNamespace(s=s)
    return Run.page_ns.fget(run), Run.target_page_ns.fget(SimpleNamespace(s=s, page_ns=Run.page_ns.fget(run)))


@pytest.mark.parametrize("migration, pack, unpack", [
    ({}, 503, 307),
    ({"data": True}, 3301, 1303),
    ({"data": True, "data_zstd_level": 3}, 3301 + 2017, 1303),  # 5318
])
def test_packing_and_unpacking_a_private_page(migration, pack, unpack):
    (p, u), target = _costs(**migration)
    assert (p, u) == (pack, unpack)
    assert target == unpack + 1009  # OS at VMPL0: no RMPADJUST


@pytest.mark.parametrize("os_vmpl, target", [(0, 307 + 1009), (2, 307 + 1009 + 211)])  # 1316, 1527
def test_rmpadjust_only_below_vmpl0(os_vmpl, target):
    assert _costs(os_vmpl)[1] == target
