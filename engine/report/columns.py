"""The figures a defense adds to its report rows and leaderboard rows.

BA, ASR and RA belong to every evaluated stage. Anything more is a defense's own: DBD's
split, for one, logs the poisoned share of its labelled part every epoch. A defense
declares such a figure once, as a ``DefenseColumn`` returned by ``report_columns()`` in
its folder's ``__init__.py`` (engine/defenses/dbd/__init__.py), and the report
(``summary.json``, the results table, a per-epoch table, a plot) and the leaderboard
(a column, its CSV mean and std) read it from there: no report code names a defense.

The report and the leaderboard take the columns as an argument; the commands that call
them (a layer above the defenses) pass ``engine.defenses.report_columns()``.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EpochPlot:
    """A line plot of the per-epoch records behind a column, one line per field."""
    file: str  # under the run's plots/
    title: str
    xlabel: str
    ylabel: str
    lines: tuple[tuple[str, str, str], ...]  # (record field, legend label, marker)


@dataclass(frozen=True)
class DefenseColumn:
    """One figure: a field of the per-epoch records (``kind`` ``record_kind`` in
    ``metrics.jsonl``) that a defense's stage logs. Its value for a stage is the last
    epoch's; ``summary.json`` keeps every epoch's under ``summary_key`` and, where the
    stage logged any, the whole records under ``summary_key + "_detail"``."""
    defenses: tuple[str, ...]  # the ``Stage.defense`` names whose rows carry it
    record_kind: str
    field: str
    summary_key: str
    metric: str  # the leaderboard's name (CSV header, with ``_std`` beside it)
    header: str  # the run report's column header
    short_header: str  # the leaderboard's column header
    legend: str  # one clause for the leaderboard's legend: "<short header>: <what it is>"
    suffix: str = "%"  # printed after the value
    detail_title: str = ""  # the per-epoch table's title in report.md ("" for none)
    detail: tuple[tuple[str, str, str], ...] = ()  # (header, record field, format) per column
    plot: EpochPlot | None = None

    @property
    def detail_key(self) -> str:
        return self.summary_key + "_detail"

    def last(self, entry: dict) -> float | None:
        """The column's value in one stage's ``summary.json`` entry: its last epoch's."""
        values = entry.get(self.summary_key) or []
        return values[-1] if values else None


def for_defenses(columns, defenses) -> list[DefenseColumn]:
    """The columns that belong to the defenses present (a run's stages, a sweep's rows),
    in the given columns' order."""
    present = set(defenses)
    return [c for c in columns if present.intersection(c.defenses)]
