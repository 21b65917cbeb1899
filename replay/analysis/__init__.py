"""Layer 9, comparisons and reports: the headline (who wins, by how much), ``diff`` of two runs, compare's
text table, the HTML report. Reads run directories (``replay.runs``); never runs a migration."""
