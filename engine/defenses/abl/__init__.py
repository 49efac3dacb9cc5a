"""ABL, "Anti-Backdoor Learning" (Li et al., NeurIPS 2021): one stage, ``abl``.

From a fresh model: isolation epochs on the whole poisoned set under a floored batch
loss (flooding or LGA: the gradient is sign(L - gamma) * grad L), the lowest-loss share
of the training set isolated by a per-sample CE pass, fine-tuning on the rest, then
gradient ascent on the isolated samples. Settings, sources and the reference code's
pitfalls: shared/reference/defenses.md; what the engine does differently:
engine/defenses/abl/README.md.
"""
from __future__ import annotations

from engine.report.columns import DefenseColumn


def report_columns() -> tuple[DefenseColumn, ...]:
    """The isolated set's quality as a poison detector (logged once, when it is drawn):
    its precision is ABL's counterpart of DBD's split share."""
    return (DefenseColumn(
        defenses=("abl",), record_kind="isolation", field="precision", summary_key="isolation",
        metric="isolated_precision", header="poisoned share of isolated set", short_header="isolated precision",
        legend="isolated precision: the share of ABL's isolated samples that really are poisoned",
        detail_title="ABL's isolated set",
        detail=(("epoch", "epoch", "{}"), ("isolated", "isolated", "{}"),
                ("poisoned isolated", "poisoned_isolated", "{}"), ("precision", "precision", "{:.2f}%"),
                ("recall", "recall", "{:.2f}%"))),)
