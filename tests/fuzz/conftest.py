"""Print the fuzz suite's counts per outcome class in pytest's terminal summary (CI logs show them)."""


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    lines = getattr(config, "_fuzz_summary", None)
    if lines:
        terminalreporter.section("fuzz: cases per outcome class")
        for line in lines:
            terminalreporter.write_line(line)
