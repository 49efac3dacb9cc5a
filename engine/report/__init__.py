"""Run outputs: metrics.jsonl, summary.json, report.md and plots."""
