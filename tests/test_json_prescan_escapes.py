"""``load_json``'s bracket pre-scan (replay/core/validate.py) after an escape: an escape covers exactly
the one character after the backslash, so the string still ends at its closing quote and the brackets
after it count. A scan that stayed "escaped" would skip the string's end and every bracket after it,
letting a document nested deeper than the limit through to the recursive parser."""

from __future__ import annotations

import pytest

from replay.core import validate


@pytest.mark.parametrize("escape", ["\\n", "\\\\", '\\"', "\\u0041"])
def test_brackets_after_an_escaped_string_still_count(escape):
    # Depth: the outer list 1 + 32 more = 33 > 32; the string before them holds one escape.
    bad = '["x' + escape + 'y", ' + "[" * 32 + "]" * 32 + "]"
    with pytest.raises(validate.RunDirError, match="^w: nested deeper than 32 levels$"):
        validate.load_json(bad, "w")
    ok = '["x' + escape + 'y", ' + "[" * 31 + "]" * 31 + "]"  # 32 levels: the limit itself passes
    assert validate.load_json(ok, "w")[0].startswith("x")


def test_two_strings_with_escapes_each_end_at_their_quote():
    # After the first string ends, "[" outside strings counts again; the second string's "[[[" does not.
    doc = '{"a": "\\t", "b": "[[[\\"", "c": ' + "[" * 2 + "]" * 2 + "}"
    assert validate.load_json(doc, "w", max_depth=3) == {"a": "\t", "b": '[[["', "c": [[]]}
    with pytest.raises(validate.RunDirError, match="^w: nested deeper than 2 levels$"):
        validate.load_json(doc, "w", max_depth=2)
