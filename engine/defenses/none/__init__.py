"""No defense: plain supervised training on the (poisoned) training set, the baseline
whose BA and ASR every defense is measured against (``defense = "none"``)."""
