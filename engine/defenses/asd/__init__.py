"""ASD, "Backdoor Defense via Adaptively Splitting Poisoned Dataset" (Gao et al., CVPR
2023): one stage, ``asd``: MixMatch from scratch, the clean pool re-drawn before every
epoch by three rules in turn (class-aware growth from clean seeds, the class-agnostic
lowest half, the meta-split). Settings, sources and the reference's pitfalls:
shared/reference/defenses.md; what the engine does differently: engine/defenses/asd/README.md.
"""
from __future__ import annotations

from engine.report.columns import DefenseColumn, EpochPlot


def report_columns() -> tuple[DefenseColumn, ...]:
    """The clean pool's quality per epoch, as DBD's split: the poisoned share of the pool
    (labelled, trained on with its given labels) is what lets the backdoor back in."""
    return (DefenseColumn(
        defenses=("asd",), record_kind="asd_pool", field="labelled_poison_share", summary_key="clean_pool",
        metric="clean_pool_poisoned_share", header="poisoned share of clean pool", short_header="pool poisoned share",
        legend="pool poisoned share: poisoned images in ASD's clean pool at the last epoch",
        detail_title="ASD's clean pool per epoch",
        detail=(("epoch", "epoch", "{}"), ("rule", "rule", "{}"), ("pool", "labelled", "{}"),
                ("poisoned share of pool", "labelled_poison_share", "{:.2f}%"),
                ("poisoned kept in pool", "poisoned_in_labelled", "{:.2f}%"),
                ("detector precision", "precision", "{:.2f}%"), ("detector recall", "recall", "{:.2f}%")),
        plot=EpochPlot(file="asd_pool.png", title="ASD: poisoned samples in the clean pool", xlabel="epoch",
                       ylabel="%", lines=(("labelled_poison_share", "poisoned share of the pool", "o"),
                                          ("poisoned_in_labelled", "poisoned samples kept in the pool", "s")))),)
