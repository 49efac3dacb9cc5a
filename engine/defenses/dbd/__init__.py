"""DBD, "Backdoor Defense via Decoupling the Training Process" (ICLR 2022): SimCLR
(``pretrain``), the linear SCE head on the frozen backbone (``linear``), the loss-based
split and MixMatch (``split``, ``finetune``), and the labelled-only ablation
(``finetune_labelled``). Settings and their reference values: shared/reference/dbd.md."""
