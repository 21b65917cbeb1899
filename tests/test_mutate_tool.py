"""tools/mutate's own machinery: which tests it picks for a mutant, the warm test server (pass, fail, hang)
and the coverage map. Mutating needs cosmic-ray (the `mutate` extra); none of this does."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load():
    loader = importlib.machinery.SourceFileLoader("mutate_tool", str(ROOT / "tools" / "mutate"))
    spec = importlib.util.spec_from_loader("mutate_tool", loader)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["mutate_tool"] = mod  # (dataclasses look their module up)
    loader.exec_module(mod)
    return mod


mt = _load()

SRC = textwrap.dedent('''\
    LIMIT = 4                      # 1
                                   # 2
    @decorate(LIMIT + 1)           # 3
    def f(x, y=2):                 # 4
        if x > LIMIT and (         # 5
                y < 3):            # 6
            return call(x,         # 7
                        y + 1)     # 8
        for i in range(x - 1):     # 9
            x += i                 # 10
        return x                   # 11
    ''')


def test_header_lines_cut_compound_statements_to_their_header():
    h = mt._header_lines(SRC)
    assert h[1] == range(1, 2)
    assert h[3] == h[4] == range(3, 5)          # decorator and signature (defaults): the def's header
    assert h[5] == h[6] == range(5, 7)          # the if's test over two lines, not its body
    assert h[7] == h[8] == range(7, 9)          # one statement over two lines
    assert h[9] == range(9, 10) and h[10] == range(10, 11) and h[11] == range(11, 12)


def _selector(lines: dict) -> object:
    cmap = {"tests": ["tests/test_validate.py::a", "tests/test_validate.py::b", "tests/test_other.py::c"],
            "durations": [0.5, 0.1, 0.2], "lines": {"replay/core/paths.py": lines}}
    return mt.Selector(cmap, {"replay/core/paths.py": SRC})


def _m(line: int):
    return mt.Mutant("replay/core/paths.py", "core/AddNot", 0, line, 0, "k")


def test_selector_takes_the_tests_that_ran_the_statement_fastest_first():
    sel = _selector({"5": [0, 1], "7": [2], "10": [0], "1": [-1], "4": [-1]})
    assert sel.select(_m(6)) == (["tests/test_validate.py::b", "tests/test_validate.py::a"], 0.6, False)
    assert sel.select(_m(8)) == (["tests/test_other.py::c"], 0.2, False)   # line 8 has no record: line 7 has
    assert sel.select(_m(10)) == (["tests/test_validate.py::a"], 0.5, False)


def test_selector_falls_back_to_the_module_for_import_time_and_unrun_statements():
    sel = _selector({"5": [0, 1], "1": [-1], "4": [-1]})
    # run at import (a constant, a default): every test of the module's files (MODULE_TESTS), fastest first
    wide = (["tests/test_validate.py::b", "tests/test_validate.py::a"], pytest.approx(0.6), True)
    assert sel.select(_m(1)) == wide
    assert sel.select(_m(4)) == wide
    assert sel.select(_m(11)) == wide                                     # run by no test in process


@pytest.mark.parametrize("rc,outcome", [(None, "timeout"), (0, "survived"), (1, "killed"), (2, "killed"),
                                        (3, "killed"), (4, "killed"), (5, "killed"), (70, "error"),
                                        (-9, "error")])
def test_exit_codes(rc, outcome):
    assert mt._outcome(rc) == outcome


def _tree(tmp_path: Path) -> Path:
    (tmp_path / "tests").mkdir()
    (tmp_path / "pkg.py").write_text("def f(x):\n    return x + 1\n\nLIMIT = 3\n")
    (tmp_path / "tests" / "test_t.py").write_text(textwrap.dedent('''\
        import time
        import pkg

        def test_pass():
            assert pkg.f(1) == 2

        def test_fail():
            assert pkg.f(1) == 3

        def test_hang():
            while pkg.LIMIT:
                time.sleep(0.01)
        '''))
    return tmp_path


def test_server_passes_fails_and_kills_a_hang(tmp_path):
    tree = _tree(tmp_path)
    server = mt.Server(tree)
    try:
        assert server.run(["tests/test_t.py::test_pass"], timeout=60)[0] == "survived"
        assert server.run(["tests/test_t.py::test_fail"], timeout=60)[0] == "killed"
        assert server.run(["tests/test_t.py::test_nothing"], timeout=60)[0] == "killed"  # nothing collected
        t0 = time.monotonic()
        outcome, secs = server.run(["tests/test_t.py::test_hang"], timeout=1.0)
        assert outcome == "timeout" and 1.0 <= secs < 30 and time.monotonic() - t0 < 30
        # a mutant written into the tree is what the next run imports (the fresh mtime beats the .pyc)
        (tree / "pkg.py").write_text("def f(x):\n    return x + 2\n\nLIMIT = 3\n")
        server.touch(tree / "pkg.py")
        assert server.run(["tests/test_t.py::test_fail"], timeout=60)[0] == "survived"
        (tree / "pkg.py").write_text("def f(x):\n    return x + 1\n\nLIMIT = 3\n")
        server.touch(tree / "pkg.py")
        assert server.run(["tests/test_t.py::test_pass"], timeout=60)[0] == "survived"
    finally:
        server.close()
    assert server.proc.returncode == 0


def test_coverage_map_records_which_test_ran_which_line(tmp_path):
    tree = _tree(tmp_path)
    doc = mt.coverage_map(tree, ["pkg.py"], ["tests/test_t.py::test_pass"], cache=None)
    assert doc["tests"] == ["tests/test_t.py::test_pass"] and doc["failed"] == []
    lines = {int(k): v for k, v in doc["lines"]["pkg.py"].items()}
    assert lines[2] == [0]                 # the function body: by the test
    assert lines[1] == [-1] and lines[4] == [-1]   # the def and the constant: at import
    with pytest.raises(SystemExit, match="unmutated tests fail"):
        mt.coverage_map(tree, ["pkg.py"], ["tests/test_t.py::test_fail"], cache=None)
    json.dumps(doc)  # (the cache stores it as JSON)


def test_stages_run_the_first_two_files_fastest_tests_first():
    tests = ([f"tests/a.py::t{i}" for i in range(30)] + [f"tests/b.py::t{i}" for i in range(5)]
             + [f"tests/c.py::t{i}" for i in range(10)] + ["tests/a.py::late"])
    dur = {t: 0.5 for t in tests}
    (first, first_s), (rest, rest_s) = mt.stages(tests, 23.0, dur.__getitem__)
    assert first == tests[:35] + ["tests/a.py::late"] and first_s == 18.0   # a's and b's tests
    assert rest == tests[35:45] and rest_s == 5.0                           # c's: a third file
    assert mt.stages(tests[:40], 20.0, dur.__getitem__) == [(tests[:40], 20.0)]   # 40 or fewer: one run
    assert mt.stages(tests, 23.0, None) == [(tests, 23.0)]                         # --select modules
    many = [f"tests/a.py::t{i}" for i in range(45)]
    (first, _), (rest, _) = mt.stages(many, 22.5, lambda t: 0.5)
    assert first == many[:40] and rest == many[40:]          # at most 40 in the first run


# --- the list of equivalent mutants (tests/equivalent-mutants.toml) ---------------------------------------

def _mutant(path="replay/m.py", op="core/NumberReplacer", line="x = 0", rank=0, lineno=3):
    return mt.Mutant(path, op, rank, lineno, 4, f"{path}\0{op}\0{line}\0{rank}")


def _eq(tmp_path, body):
    f = tmp_path / "eq.toml"
    f.write_text(textwrap.dedent(body))
    return f


ENTRY = '''\
    [[equivalent]]
    path = "replay/m.py"
    operator = "core/NumberReplacer"
    line = "x = 0"
    what = "`x = 0` -> 1"
    why = "x is set again before it is read"
    '''


def test_equivalents_match_by_file_operator_line_text_and_rank(tmp_path):
    eqs = mt.load_equivalents(_eq(tmp_path, ENTRY + ENTRY.replace('"x = 0"', '"y = 0"') + "rank = 1\n"))
    assert [e.rank for e in eqs] == [None, 1]
    a, a2 = _mutant(), _mutant(rank=1, lineno=9)                     # two `x = 0` lines: no rank = both
    b0, b1 = _mutant(line="y = 0"), _mutant(line="y = 0", rank=1)    # rank 1 only
    other_op, other_file = _mutant(op="core/AddNot"), _mutant(path="replay/n.py")
    of, stale = mt.equivalence(eqs, [a, a2, b0, b1, other_op, other_file], ["replay/m.py", "replay/n.py"])
    assert set(of) == {a.key, a2.key, b1.key} and stale == []
    of, stale = mt.equivalence(eqs, [a], ["replay/m.py"])
    assert stale == [eqs[1]]                                         # its line is gone
    assert mt.equivalence(eqs, [a], ["replay/other.py"])[1] == []   # out of scope: not stale


@pytest.mark.parametrize("body, message", [
    (ENTRY.replace("why =", "whyy ="), "unknown field 'whyy' (did you mean 'why'?)"),
    (ENTRY.replace('what = "`x = 0` -> 1"\n', ""), "`what` must be a non-empty string"),
    (ENTRY.replace('"core/NumberReplacer"', '"NumberReplacer"'), "cosmic-ray's full name"),
    (ENTRY + "rank = true\n", "`rank` must be an integer"),
    (ENTRY.replace('"x = 0"', '"  "'), "`line` must be a non-empty string"),
    ("[[equivalents]]\n", "unknown top-level key 'equivalents'"),
    ("[[equivalent]\n", "not readable TOML"),
])
def test_a_bad_equivalents_file_is_one_line_naming_the_entry(tmp_path, body, message):
    with pytest.raises(SystemExit) as e:
        mt.load_equivalents(_eq(tmp_path, body))
    assert message in str(e.value) and str(tmp_path / "eq.toml") in str(e.value) and "\n" not in str(e.value)
    assert mt.load_equivalents(tmp_path / "absent.toml") == []


def test_the_score_leaves_listed_equivalents_out_and_flags_a_listed_mutant_that_was_killed(tmp_path, capsys):
    import types
    eqs = mt.load_equivalents(_eq(tmp_path, ENTRY + ENTRY.replace('"x = 0"', '"z = 0"')))
    ms = [_mutant(line=f"v{i} = 0", lineno=i) for i in range(7)]
    eq_survivor, eq_killed = _mutant(lineno=10), _mutant(line="z = 0", lineno=11)
    results = ([mt.Result(m, "killed", 1.0) for m in ms[:5]] + [mt.Result(ms[5], "timeout", 1.0)]
               + [mt.Result(ms[6], "survived", 1.0), mt.Result(eq_survivor, "survived", 1.0),
                  mt.Result(eq_killed, "killed", 1.0)])
    args = types.SimpleNamespace(select="lines", quick=False, rerun=None, sample=1, jobs=2, md=None,
                                 json=tmp_path / "r.json", fail_under=87.5, equivalent=tmp_path / "eq.toml")
    equiv = mt.equivalence(eqs, [r.mutant for r in results], ["replay/m.py"])
    # killed 6 + 1 (the wrongly listed one) = 7 of 8 non-equivalent = 87.5%; 7 of 9 of all = 77.8%
    assert mt.report(results, ["replay/m.py"], args, 9, 1.0, 0.0, equiv) == 0
    out = capsys.readouterr().out
    assert "# Mutation score: 7/8 = 87.5% (without 1 equivalent mutants; 7/9 = 77.8% of all)" in out
    assert "| replay/m.py | 6 | 1 | 1 | 1 | 87.5% |" in out
    todo = out.split("## Surviving mutants")[1].split("##")[0]
    assert "replay/m.py:6 " in todo and "replay/m.py:10 " not in todo      # the listed one is not a to-do
    assert "killed, so not equivalent: replay/m.py:11" in out
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["score_percent"] == 87.5 and doc["score_all_percent"] == 77.78
    assert [r["line"] for r in doc["results"] if r["equivalent"]] == [10]
    args.fail_under = 87.6
    assert mt.report(results, ["replay/m.py"], args, 9, 1.0, 0.0, equiv) == 1


def test_the_equivalents_table_is_one_row_per_entry_sorted_with_pipes_escaped(tmp_path):
    eqs = mt.load_equivalents(_eq(tmp_path, ENTRY.replace('"x = 0"', '"z = 0"')
                                  + ENTRY.replace("x is set", "a | b: x is\\n set")))
    assert mt.equivalents_table(eqs).splitlines() == [
        "| mutant | why it is equivalent |", "|---|---|",
        "| `m.py`: `x = 0` -> 1 | a \\| b: x is set again before it is read |",
        "| `m.py`: `x = 0` -> 1 | x is set again before it is read |"]


def test_the_readme_shows_exactly_the_equivalents_list():
    readme = (ROOT / "tests" / "README.md").read_text()
    begin = "<!-- equivalent-mutants: begin (generated by tools/mutate --equivalents-md) -->\n"
    shown = readme.split(begin)[1].split("<!-- equivalent-mutants: end -->")[0]
    assert shown == mt.equivalents_table(mt.load_equivalents(mt.EQUIVALENTS)), \
        "tests/README.md's table differs from tests/equivalent-mutants.toml: paste `tools/mutate --equivalents-md`"


def test_every_listed_equivalent_is_on_a_line_that_exists():
    # (tools/mutate also checks the operator applies there; that needs cosmic-ray, which tests do not)
    eqs = mt.load_equivalents(mt.EQUIVALENTS)
    assert len(eqs) >= 100
    lines = {}
    for e in eqs:
        if e.path not in lines:
            lines[e.path] = [ln.strip() for ln in (ROOT / e.path).read_text().splitlines()]
        assert e.line in lines[e.path], f"{e.path}: no line `{e.line}`"


def test_every_test_file_is_in_a_selection_or_named_outside_the_scope():
    selected = {t for tests in [*mt.MODULE_TESTS.values(), *mt.DEFAULT_TESTS.values()] for t in tests}
    files = {f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py")}
    assert sorted(files - selected - set(mt.OUTSIDE_SCOPE)) == [], \
        "add these to tools/mutate's MODULE_TESTS (or OUTSIDE_SCOPE): the mutation pass would not run them"
    assert sorted(set(mt.OUTSIDE_SCOPE) - files) == [] and not selected & set(mt.OUTSIDE_SCOPE)


def test_a_rescore_keeps_earlier_outcomes_by_key_and_marks_new_mutants_not_run():
    kept, new = _mutant(lineno=3), _mutant(line="w = 0", lineno=4)
    old = {kept.key: {"outcome": "timeout", "seconds": 2.5, "diff": "- x = 0 | + x = 1", "tests": 7},
           _mutant(line="gone = 0").key: {"outcome": "killed"}}
    got = mt.rescored([kept, new], old)
    assert [(r.mutant, r.outcome, r.seconds, r.diff, r.tests) for r in got] == [
        (kept, "timeout", 2.5, "- x = 0 | + x = 1", 7), (new, "not-run", 0.0, "", 0)]


def test_lines_a_module_scoped_fixture_runs_are_credited_to_every_test_that_uses_it(tmp_path):
    # The fixture runs pkg.f once, inside the first test that needs it; the second test reads its result
    # and would fail alone on a mutant of f: both must be selected for f's body.
    tree = _tree(tmp_path)
    (tree / "tests" / "test_m.py").write_text(textwrap.dedent('''\
        import pytest
        import pkg

        @pytest.fixture(scope="module")
        def once():
            return pkg.f(41)

        def test_first(once):
            assert once

        def test_second(once):
            assert once == 42

        def test_other():
            assert True
        '''))
    doc = mt.coverage_map(tree, ["pkg.py"], ["tests/test_m.py"], cache=None)
    assert doc["tests"] == [f"tests/test_m.py::test_{n}" for n in ("first", "second", "other")]
    assert doc["lines"]["pkg.py"]["2"] == [0, 1]        # f's body: both users of the fixture, not test_other
