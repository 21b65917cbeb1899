"""Data mode through the driver: the same migration with real, encrypted contents over the attested sealed
channel. Both engines agree; metadata and data runs with the same costs share every version-level fact;
each failed attestation check refuses the migration before any page moves; a token mismatch keeps the
source; shared pages travel unprotected and the record says how many."""

from __future__ import annotations

import pytest

from replay.engines.common import ENGINE_KINDS
from replay.migration import run
from replay.scenario.spec import make_scenario
from test_precopy import COSTS, write_trace

ROWS = sorted([(i, 0, i) for i in range(16)] + [(2000 + 300 * k, k % 2, (k * 7) % 16) for k in range(80)])
SAME_COSTS = {"data_page_pack_ns": COSTS["page_pack_ns"], "data_page_unpack_ns": COSTS["page_unpack_ns"],
              "data_zstd_page_ns": 0}


def scen(mode="precopy", data=True, attestation=None, costs=None, **m):
    mig = {"mode": mode, "data": data, "start_ns": 1000, "bandwidth_bytes_per_s": 5_000_000_000, "latency_ns": 50,
           "downtime_limit_ns": 2000, "agents_initial": 1, "agents_max": 1, "shadow_apic_id_base": 8,
           "shadow_apic_ids": 1, "burst_ns": 4000, "bandwidth_period_ns": 3000, "precopy_rounds": 2, **m}
    return make_scenario(guest={"os_vmpl": 2, "memslots": 1}, trace={"file": "x"}, migration=mig,
                         costs={**COSTS, **(costs or {})}, attestation=attestation or {})


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    return write_trace(tmp_path_factory.mktemp("d") / "t.arrow", ROWS, npages=16, vcpus=2, shared=[(12, 13)])


@pytest.mark.parametrize("mode", ["precopy", "postcopy", "hybrid"])
@pytest.mark.parametrize("strategy", ["mirror-vm", "shadow-vcpu"])
def test_engines_agree_in_data_mode(trace, mode, strategy):
    a, b = (run(scen(mode), strategy=strategy, engine=e, trace_path=trace) for e in ENGINE_KINDS)
    a.summary["tool"]["engine"] = b.summary["tool"]["engine"] = ""
    assert a.summary == b.summary
    assert a.status == "completed" and all(a.summary["invariants"].values())
    p = a.summary["data"]["plaintext"]
    assert p["end_of_trace"] == p["no_migration"] != ""
    sec = a.summary["metrics"]["security"]
    assert sec["handshake_verdict"] == "accepted" and sec["token"] == "match"
    assert sec["target"]["outcomes"] == {"accepted": sum(sec["source"]["sequences"].values())}
    assert sec["shared_pages_unprotected"] > 0  # gfns 12, 13 are shared: plain on the wire


@pytest.mark.parametrize("mode", ["precopy", "postcopy"])
def test_metadata_and_data_runs_share_every_version_level_fact(trace, mode):
    meta = run(scen(mode, data=False, costs=SAME_COSTS), strategy="mirror-vm", trace_path=trace)
    data = run(scen(mode, data=True, costs=SAME_COSTS), strategy="mirror-vm", trace_path=trace)
    md = dict(data.summary["metrics"])
    del md["security"]
    assert md == meta.summary["metrics"]
    assert data.summary["digests"] == meta.summary["digests"]
    assert data.rounds.equals(meta.rounds)


@pytest.mark.parametrize("strategy", ["mirror-vm", "shadow-vcpu"])
@pytest.mark.parametrize("mode", ["precopy", "postcopy", "hybrid"])
def test_data_mode_prices_every_agent_page_at_the_data_mode_costs(trace, mode, strategy):
    """The documented rule: in data mode the data-mode costs stand in for page_pack_ns / page_unpack_ns
    wherever an agent handles a page (transfers, post-copy faults, VMSAs, sizing the agents). A data run
    whose metadata costs are absurd and whose data costs are P, U must then time exactly like a metadata
    run whose page costs are P, U."""
    pack, unpack = 1_730, 2_290  # P, U: odd values, so any mix-up shows in the sums
    common = {"pvalidate_ns": 110, "rmpadjust_ns": 70}
    meta = run(scen(mode, data=False, agents_max=3,
                    costs={**common, "page_pack_ns": pack, "page_unpack_ns": unpack}),
               strategy=strategy, trace_path=trace)
    data = run(scen(mode, data=True, agents_max=3,
                    costs={**common, "page_pack_ns": 999_999, "page_unpack_ns": 999_999, "data_page_pack_ns": pack,
                           "data_page_unpack_ns": unpack, "data_zstd_page_ns": 0}),
               strategy=strategy, trace_path=trace)
    md = dict(data.summary["metrics"])
    del md["security"]
    assert md == meta.summary["metrics"]
    assert data.rounds.equals(meta.rounds)


@pytest.mark.parametrize("attestation, check", [
    ({"target_root": "rogue"}, "chain"),
    ({"target_measurement": "svsm-evil"}, "measurement"),
    ({"target_debug": True}, "policy"),
    ({"target_migratable": False}, "policy"),
    ({"target_tcb": "9.0.20.72"}, "tcb"),
])
def test_a_failed_attestation_check_refuses_before_any_page_moves(trace, attestation, check):
    r = run(scen(attestation=attestation), strategy="shadow-vcpu", trace_path=trace)
    m, d = r.summary["metrics"], r.summary["digests"]
    assert r.status == "aborted" and check in r.summary["status_reason"]
    assert m["security"]["handshake_verdict"] == check and m["security"]["detected_by"] == f"attestation.{check}"
    assert m["pages_sent"] == 0 and m["bytes_sent"] == 0 and m["security"]["source"] == {}
    assert d["end_of_trace"] == d["no_migration"] and d["target_at_switchover"] == ""
    p = r.summary["data"]["plaintext"]
    assert p["end_of_trace"] == p["no_migration"]  # the source ran on, intact


def test_a_token_mismatch_keeps_the_source(trace, monkeypatch):
    from replay.security.session import DataPlane
    from replay.security.token import TokenOutcome

    def forged(self, tamper=None):
        self.token_outcome = TokenOutcome.HASH_MISMATCH
        return self.token_outcome

    monkeypatch.setattr(DataPlane, "finish", forged)
    r = run(scen(), strategy="mirror-vm", trace_path=trace)
    d, p = r.summary["digests"], r.summary["data"]["plaintext"]
    assert r.status == "aborted" and "validation token: hash_mismatch" in r.summary["status_reason"]
    assert r.summary["metrics"]["security"]["detected_by"] == "token.hash_mismatch"
    assert d["target_at_switchover"] == "" and d["end_of_trace"] == d["no_migration"]
    assert p["end_of_trace"] == p["no_migration"]
    assert "resume" not in [e["kind"] for e in r.events.to_pylist()]


def test_compressed_packets_are_counted_before_and_after(trace):
    r = run(scen(data_zstd_level=3), strategy="mirror-vm", trace_path=trace)
    src = r.summary["metrics"]["security"]["source"]
    assert r.status == "completed" and r.summary["metrics"]["security"]["zstd_level"] == 3
    assert src["compressed_bytes"] <= src["payload_bytes"] and src["compressed_pages"] > 0


def test_report_and_compare_show_the_security_facts(tmp_path, trace, capsys):
    from replay.cli import main

    (tmp_path / "t.arrow").write_bytes(trace.read_bytes())
    (tmp_path / "s.toml").write_text('[guest]\nos_vmpl = 2\n[trace]\nfile = "t.arrow"\n[migration]\nstart_ns = 1000\n'
                                     'shadow_apic_id_base = 8\nagents_max = 1\n')
    assert main(["compare", str(tmp_path / "s.toml"), "--out", str(tmp_path / "c"), "--data", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "validation token" in out and "match" in out and "packets accepted by the target" in out
    html = (tmp_path / "c" / "report.html").read_text()
    assert html.count("Data mode: the attested, sealed channel") == 2
    assert "verify_target" in html and "derive_transport_keys" in html


def test_the_plaintext_reference_is_replayed_once_per_trace(trace, tmp_path, monkeypatch):
    import replay.security.memory as memory

    monkeypatch.setenv("SNP_REPLAY_CACHE", str(tmp_path))
    a = run(scen(), strategy="mirror-vm", trace_path=trace)

    def again(*args, **kw):
        raise AssertionError("the plaintext reference was replayed a second time")

    monkeypatch.setattr(memory, "replay_plaintext_digest", again)
    b = run(scen(), strategy="shadow-vcpu", trace_path=trace)
    p = b.summary["data"]["plaintext"]
    assert p["no_migration"] == a.summary["data"]["plaintext"]["no_migration"] == p["end_of_trace"]


@pytest.mark.parametrize("mode", ["precopy", "postcopy", "hybrid"])
def test_two_threads_or_one_the_run_record_is_the_same(trace, mode, monkeypatch):
    """Data mode cuts big batches (seal, open, install, zstd) in halves on two threads; every batch is cut
    here (SPLIT_MIN 2), and the record must be byte for byte the one-thread record."""
    from replay.security import parallel

    records = []
    for threads in (1, 2):
        monkeypatch.setattr(parallel, "THREADS", threads)
        monkeypatch.setattr(parallel, "SPLIT_MIN", 2)
        r = run(scen(mode, data_zstd_level=3), strategy="shadow-vcpu", trace_path=trace)
        assert r.status == "completed" and r.summary["metrics"]["security"]["source"]["compressed_pages"] > 0
        records.append((r.summary, r.rounds, r.events))
    assert records[0][0] == records[1][0]
    assert records[0][1].equals(records[1][1]) and records[0][2].equals(records[1][2])


def test_each_hosts_dram_holds_private_pages_under_the_tweak_of_its_own_spa(trace, monkeypatch):
    """XTS tweaks with the system physical address the page engine gives each host's copy of a page: the
    source's DRAM ciphertext of a private page is AES-XTS of its plain text at ``spa(SOURCE, gfn)``."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    from replay.migration import Migration
    from replay.migration import data as datamod
    from replay.scenario.strategies import SOURCE, TARGET

    made = []
    orig = datamod.DataMode.__init__

    def init(self, *a, **k):
        orig(self, *a, **k)
        made.append(self)

    monkeypatch.setattr(datamod.DataMode, "__init__", init)
    out = Migration(scen(), trace, engine="reference").run()
    assert out.status == "completed"
    (dm,) = made
    for host in (SOURCE, TARGET):
        mem = dm.dp.memory[host]
        for gfn in (0, 5, 15):  # private pages (12 and 13 are shared)
            spa = dm.eng.spa(host, gfn)
            enc = Cipher(algorithms.AES(mem.key), modes.XTS((spa * 4096).to_bytes(16, "little"))).encryptor()
            assert mem.read_raw(gfn) == enc.update(mem.read_plain(gfn)) + enc.finalize(), (host, gfn)
