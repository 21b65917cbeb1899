"""Scenario parsing: defaults, units, overrides, unknown keys with hints, validation errors."""

import pytest

from replay.cli import main
from replay.core.errors import ScenarioError
from replay.scenario.spec import Costs, load_scenario, make_scenario, parse_scenario_text

GEN = {"generator": "uniform", "events": 100}


def test_defaults_and_units():
    s = parse_scenario_text(
        """
        seed = 7
        [guest]
        size = "16GiB"
        vcpus = 4
        [trace]
        generator = "uniform"
        events = 1000
        [migration]
        strategy = "shadow-vcpu"
        start_ns = "1.5s"
        downtime_limit_ns = "300ms"
        """
    )
    assert s.guest.guest_bytes == 16 << 30
    assert s.migration.start_ns == 1_500_000_000
    assert s.migration.downtime_limit_ns == 300_000_000
    assert s.migration.strategy == "shadow-vcpu"
    assert s.costs == Costs()
    r = s.resolved(guest_bytes=16 << 30, vcpus=4)
    assert r["guest"]["apic_id_last"] == 3
    assert r["trace"]["seed"] == 7
    assert r["costs"]["page_pack_ns"] == Costs().page_pack_ns


def test_unknown_key_gets_a_hint():
    with pytest.raises(ScenarioError, match=r"migration\.bandwith_bytes_per_s: unknown key \(did you mean 'bandwidth_bytes_per_s'\?\)"):
        make_scenario(trace=GEN, migration={"bandwith_bytes_per_s": 1})
    with pytest.raises(ScenarioError, match=r"did you mean 'migration'"):
        make_scenario(trace=GEN, migraton={})


def test_overrides_any_key():
    s = parse_scenario_text('[trace]\ngenerator = "uniform"\nevents = 5\n',
                            overrides=["migration.strategy=shadow-vcpu", "costs.page_pack_ns=7", "kernel.gmem_link=false",
                                       "guest.size=1GiB", "seed=3"])
    assert (s.migration.strategy, s.costs.page_pack_ns, s.kernel.gmem_link, s.guest.guest_bytes, s.seed) == \
        ("shadow-vcpu", 7, False, 1 << 30, 3)
    with pytest.raises(ScenarioError, match=r"--set 'costs\.page_pack_ns': expected section\.key=value"):
        parse_scenario_text('[trace]\ngenerator = "uniform"\nevents = 5\n', overrides=["costs.page_pack_ns"])
    with pytest.raises(ScenarioError, match=r"unknown section 'cost' \(did you mean 'costs'\?\)"):
        parse_scenario_text('[trace]\ngenerator = "uniform"\nevents = 5\n', overrides=["cost.x=1"])


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"trace": GEN, "migration": {"strategy": "mirror"}}, r"strategy 'mirror' is not one of mirror-vm, shadow-vcpu \(did you mean 'mirror-vm'\?\)"),
        ({"trace": GEN, "migration": {"mode": "pre-copy"}}, r"mode 'pre-copy' is not one of"),
        ({"trace": {}}, r"exactly one of 'file' or 'generator'"),
        ({"trace": {"file": "x.arrow", "generator": "uniform"}}, r"exactly one of"),
        ({"trace": GEN, "costs": {"page_pack_ns": "fast"}}, r"costs\.page_pack_ns: expected an integer"),
        ({"trace": GEN, "costs": {"page_pack_ns": -1}}, r"costs\.page_pack_ns: must be >= 0"),
        ({"trace": GEN, "kernel": {"gmem_link": 1}}, r"kernel\.gmem_link: expected true or false"),
        ({"trace": GEN, "migration": {"agents_initial": 5, "agents_max": 4}}, r"agents_initial must be between 1 and agents_max"),
        ({"trace": GEN, "fault": [{"kind": "cable_cut"}]}, r"fault\[0\]\.kind 'cable_cut' is not one of link_down"),
        ({"trace": GEN, "fault": [{"at_ns": 1, "duration_ns": 0}]}, r"duration_ns must be > 0, or -1 for forever"),
    ],
)
def test_bad_scenarios(sections, message):
    with pytest.raises(ScenarioError, match=message):
        make_scenario(**sections)


def test_link_fault_units():
    s = make_scenario(trace=GEN, fault=[{"at_ns": "2s", "duration_ns": "forever"}, {"at_ns": 5, "duration_ns": "10ms"}])
    assert [(f.at_ns, f.duration_ns) for f in s.faults] == [(2_000_000_000, -1), (5, 10_000_000)]


def test_cli_bad_scenario_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[trace]\ngenerator = "uniform"\nevents = 5\n[migration]\nmax_round = 3\n')
    assert main(["run", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "migration.max_round: unknown key (did you mean 'max_rounds'?)" in err
    assert not (tmp_path / "out").exists()
    assert main(["run", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "out")]) == 2
    assert "no such scenario file" in capsys.readouterr().err
    bad.write_text("[trace\n")
    assert main(["run", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert "invalid TOML" in capsys.readouterr().err


def test_load_scenario_resolves_relative_trace(tmp_path):
    (tmp_path / "s.toml").write_text('[trace]\nfile = "t.arrow"\n')
    s = load_scenario(tmp_path / "s.toml")
    assert s.base_dir == str(tmp_path)
