"""DBD, "Backdoor Defense via Decoupling the Training Process" (ICLR 2022): SimCLR
(``pretrain``), the linear SCE head on the frozen backbone (``linear``), the loss-based
split and MixMatch (``split``, ``finetune``), and the labelled-only ablation
(``finetune_labelled``). Settings and their reference values: shared/reference/dbd.md."""
from __future__ import annotations

from engine.report.columns import DefenseColumn, EpochPlot


def report_columns() -> tuple[DefenseColumn, ...]:
    """The split's quality as a poison detector, logged every epoch by ``EpochSplit``
    (split.py): the poisoned share of the labelled part is the figure the paper tracks."""
    return (DefenseColumn(
        defenses=("dbd", "dbd_labelled_only"), record_kind="split", field="labelled_poison_share",
        summary_key="split", metric="poisoned_share", header="poisoned share of labelled split",
        short_header="poisoned share",
        legend="poisoned share: poisoned images in the split's labelled part at the last epoch",
        detail_title="Split quality per epoch",
        detail=(("epoch", "epoch", "{}"), ("labelled", "labelled", "{}"),
                ("poisoned share of labelled", "labelled_poison_share", "{:.2f}%"),
                ("poisoned kept labelled", "poisoned_in_labelled", "{:.2f}%"),
                ("detector precision", "precision", "{:.2f}%"), ("detector recall", "recall", "{:.2f}%")),
        plot=EpochPlot(file="split.png", title="DBD split: poisoned samples in the labelled part",
                       xlabel="fine-tuning epoch", ylabel="%",
                       lines=(("labelled_poison_share", "poisoned share of labelled part", "o"),
                              ("poisoned_in_labelled", "poisoned samples kept labelled", "s")))),)
