"""Reports lead with the answer (replay.analysis.headline): the winner per headline metric and by how much, in the
HTML report, `replay compare`'s table and `tools/diff`'s text; metrics zero or absent in every run folded
into one line that says how many (and a flag shows them)."""

from __future__ import annotations

import re
from fractions import Fraction

from replay.analysis.comparetext import table
from replay.analysis.diff import diff_runs, render_text
from replay.analysis.headline import all_blank, headline_lines, verdicts
from replay.analysis.report import render_html
from replay.runs.record import load_run
from runfixtures import base_summary, make_run


def summary(status: str = "completed", **metrics) -> dict:
    s = base_summary()
    s["status"] = status
    s["metrics"].update(metrics)
    return s


def test_winner_margin_and_ratio_hand_checked():
    # downtime 3,400,000 vs 1,200,000 ns: B wins by 2,200,000 ns, ratio 17/6 = 2.833... -> "2.83x"
    a = summary(downtime_ns=3_400_000, guest_slowdown_ppm=10_000, total_ns=7, bytes_sent=3 << 20)
    b = summary(downtime_ns=1_200_000, guest_slowdown_ppm=290_000, total_ns=7, bytes_sent=0)
    v = {x.metric.key: x for x in verdicts([a, b])}
    assert (v["downtime_ns"].winner, v["downtime_ns"].margin, v["downtime_ns"].ratio) == (1, 2_200_000, Fraction(17, 6))
    lines = headline_lines([a, b], ["mirror-vm", "shadow-vcpu"])
    assert lines[0] == "shadow-vcpu wins on downtime (1.200 ms vs 3.400 ms: 2.200 ms or 2.83x lower)"
    # the slowdown is the other way round: 10,000 ppm = 1.00 %, 290,000 ppm = 29.00 %, 29x
    assert lines[1] == "mirror-vm wins on guest slowdown (1.00 % vs 29.00 %: 28.00 % or 29.00x lower)"
    # equal values: a tie, no winner (one ns either side would make one)
    assert lines[2] == "total migration time: a tie (7 ns each)"
    assert verdicts([a, summary(total_ns=6)])[2].winner == 1 and verdicts([a, summary(total_ns=8)])[2].winner == 0
    # a winner at 0 has no ratio: only the absolute difference
    assert lines[3] == "shadow-vcpu wins on bytes sent (0 B vs 3.00 MiB: 3.00 MiB lower)"


def test_only_completed_runs_compete_and_three_runs_name_the_runner_up():
    done = summary(downtime_ns=5_000)
    aborted = summary("aborted", downtime_ns=1)  # lower, but it did not migrate: not a win
    assert headline_lines([done, aborted], ["a", "b"])[0] == "downtime: no comparison (a completed with a value)"
    assert headline_lines([aborted, aborted], ["a", "b"])[0] == "downtime: no comparison (no run completed with a value)"
    three = [summary(downtime_ns=9_000), summary(downtime_ns=4_000), summary(downtime_ns=6_000)]
    v = verdicts(three)[0]
    assert (v.winner, v.runner_up, v.margin) == (1, 2, 2_000)  # against the next best, not the worst


def test_blank_means_zero_or_absent_never_false():
    assert all_blank([0, None]) and all_blank([0, 0.0])
    assert not all_blank([0, 1]) and not all_blank([False, False]) and not all_blank(["", ""])
    marker = object()
    assert all_blank([marker, 0], marker) and not all_blank([marker, 2], marker)


def _blank_leaves(metrics: dict) -> int:
    """The test's own count: numeric leaves equal to 0 (lists element-wise; histograms are not metrics)."""
    n = 0
    for k, v in metrics.items():
        if k == "latency_hist":
            continue
        if isinstance(v, dict):
            n += _blank_leaves(v)
        elif isinstance(v, list):
            n += sum(1 for x in v if x == 0 and not isinstance(x, bool))
        elif v == 0 and not isinstance(v, bool):
            n += 1
    return n


def test_report_opens_with_the_headline_and_folds_blank_metrics(tmp_path):
    a = load_run(make_run(tmp_path / "a"))
    b = load_run(make_run(tmp_path / "b", strategy="shadow-vcpu", metrics={"downtime_ns": 60_000_000}))
    folded = _blank_leaves(base_summary()["metrics"])
    assert folded == 29  # postcopy_bytes/_pages, primary_vm_agents, 5 RMP counters, 9 faults, 12 post-copy
    text = render_html([a, b])
    summary_html = text[text.index('<section id="summary">'):text.index('<section id="plots">')]
    first = re.search(r"<li>([^<]*)</li>", summary_html).group(1)
    assert first == "shadow-vcpu/precopy wins on downtime (60.000 ms vs 120.000 ms: 60.000 ms or 2.00x lower)"
    assert summary_html.index('class="headline"') < summary_html.index("<table>")  # before any table
    assert f"{folded} metrics zero or absent in every run folded" in text
    metrics_html = text[text.index('<section id="metrics">'):text.index('<section id="runs">')]
    shown = metrics_html[:metrics_html.index('<details id="folded">')]
    assert "faults.npf_asid" not in shown and "faults.npf_asid" in metrics_html  # folded, one click away
    full = render_html([a, b], all_metrics=True)
    assert "folded" not in full[full.index('<section id="metrics">'):] and "faults.npf_asid" in full


def test_compare_table_leads_with_the_answer_and_folds(tmp_path):
    a, b = base_summary(), base_summary("shadow-vcpu")
    for s in (a, b):  # what a real run's summary adds to the fixture's
        s["kernel"] = {"profile": "custom", "verdict": "ok"}
        s["metrics"]["cpu_demand"] = {"model": "busy", "quota_cpus_milli": 4000}
    b["metrics"]["bytes_sent"] = 615_000_000  # half of A's 1,230,000,000
    text = table([a, b])
    lines = text.splitlines()
    assert lines[3] == "shadow-vcpu wins on bytes sent (586.51 MiB vs 1.15 GiB: 586.51 MiB or 2.00x lower)"
    assert lines[0] == "downtime: a tie (120.000 ms each)" and lines[4] == ""
    # pre-copy rows zero in both: post-copy bytes, primary-VM agents' CPU, RMP faults; absent from the
    # fixture in both: switchover reason, guest CPU demanded, host CPUs taken. False is a value: kept.
    assert "6 metrics zero or absent in every run folded (--all-metrics shows them)" in text
    assert "CPU: primary-VM agents" not in text and "RMP faults" not in text and "switchover reason" not in text
    assert "downtime limit exceeded" in text and "page-state changes (source)" in text  # False; 4 and 4
    full = table([a, b], all_metrics=True)
    assert "CPU: primary-VM agents" in full and "RMP faults" in full and "folded" not in full


def test_diff_text_leads_with_the_answer_and_folds(tmp_path, capsys):
    from replay.cli import main

    a, b = make_run(tmp_path / "a"), make_run(tmp_path / "b", metrics={"total_ns": 3_000_000_000})
    res = diff_runs(load_run(a), load_run(b))
    out = render_text(res)
    head = out.split("\n\n")[1].splitlines()  # the outcome block
    assert head[0] == "Outcome: SAME END STATE"
    assert "  A (mirror-vm/precopy) wins on total migration time (2.400 s vs 3.000 s: 600.000 ms or 1.25x lower)" in head
    assert "  29 metrics zero or absent in both runs folded (--all-metrics shows them)" in out
    assert "npf_asid" not in out and "npf_asid" in render_text(res, all_metrics=True)
    assert main(["diff", str(a), str(b), "--all-metrics"]) == 0
    assert "npf_asid" in capsys.readouterr().out


def test_small_formatters_by_hand():
    """The slowdown percentage, the fold line's plural, a boolean never taken for a metric, and the demand
    line (its quota in CPUs from milli-CPUs), from tools/mutate's survivors in headline.py."""
    from replay.analysis.headline import demand_text, folded_line, format_ppm

    assert format_ppm(1_000_000) == "100.00 %" and format_ppm(250_000) == "25.00 %"
    assert folded_line(1, "every run", "--x").startswith("1 metric zero")
    assert folded_line(2, "every run", "--x").startswith("2 metrics zero")
    done = {"status": "completed", "metrics": {"downtime_ns": True}}
    assert verdicts([done, done])[0].values == (None, None)  # True is not 1 ns of downtime
    assert demand_text({"metrics": {}}) == "every vCPU busy at all times (older record)"
    assert demand_text({}) == "every vCPU busy at all times (older record)"
    assert demand_text({"metrics": {"cpu_demand": {"model": "busy", "quota_cpus_milli": 2500}}}) == \
        "every vCPU busy at all times; quota 2.5 CPUs"
    assert demand_text({"metrics": {"cpu_demand": {"model": "busy"}}}).endswith("quota 0 CPUs")
