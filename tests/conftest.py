"""Shared pytest fixtures.

Engine fixtures (tests/test_engine_*.py): ``engine_kind`` runs a test once per page engine, ``make_batch``
builds trace record batches directly (no dependency on replay/trace.py), and the ``engine`` hypothesis
profile (derandomized, so CI runs are reproducible) is what the engine property tests use.
"""

from __future__ import annotations

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, settings

from replay.engine import BATCH_COLUMNS, ENGINE_KINDS

# ---------------------------------------------------------------------------------------------- engines

settings.register_profile(
    "engine",
    derandomize=True,
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)


@pytest.fixture(params=ENGINE_KINDS)
def engine_kind(request) -> str:
    """Each engine kind in turn ("cython", "reference")."""
    return request.param


def _make_batch(rows) -> pa.RecordBatch:
    """A trace record batch from rows ``(t_ns, vcpu, gpa, len, op[, value])``."""
    rows = [tuple(r) + (0,) * (6 - len(r)) for r in rows]
    cols = list(zip(*rows)) if rows else [()] * 6
    return pa.RecordBatch.from_arrays(
        [pa.array(list(c), type=t) for c, (_, t) in zip(cols, BATCH_COLUMNS)],
        names=[n for n, _ in BATCH_COLUMNS],
    )


@pytest.fixture
def make_batch():
    """``make_batch(rows)``: a trace record batch from ``(t_ns, vcpu, gpa, len, op[, value])`` tuples."""
    return _make_batch
