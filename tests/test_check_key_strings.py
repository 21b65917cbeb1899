"""Scenario string keys at their limits (replay/core/validate.py ``check_key`` with a string default): a
string of exactly ``MAX_STRING`` (4096) characters passes and one more is refused with its length, a
value that is not a string is refused as such, and a table or free-form key is not held to string rules."""

from __future__ import annotations

import pytest

from replay.core import validate
from replay.core.errors import ScenarioError


def test_a_string_of_exactly_max_string_passes_and_one_more_is_refused():
    assert validate.MAX_STRING == 4096
    ok = "a" * 4096
    assert validate.check_key("trace", "name", ok, "", "w.name") == ok
    with pytest.raises(ScenarioError, match=r"^w\.name: string of 4097 characters \(at most 4096\)$"):
        validate.check_key("trace", "name", ok + "b", "", "w.name")


@pytest.mark.parametrize("value", [5, True, ["x"], {"a": "b"}, None])
def test_a_string_key_refuses_other_types(value):
    with pytest.raises(ScenarioError, match=r"^w\.name: expected a string, got "):
        validate.check_key("trace", "name", value, "default", "w.name")


def test_tables_and_free_form_keys_are_not_held_to_string_rules():
    # A table default takes a table (not a string); a default of no known kind (None) takes any value.
    assert validate.check_key("x", "t", {"a": 1}, {}, "w.t") == {"a": 1}
    with pytest.raises(ScenarioError, match=r"^w\.t: expected a table, got "):
        validate.check_key("x", "t", "a string", {}, "w.t")
    long = "z" * 5000
    assert validate.check_key("x", "free", long, None, "w.free") == long
    assert validate.check_key("x", "free", 7, None, "w.free") == 7
