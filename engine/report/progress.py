"""A progress bar with images/second, shown on rank 0 only."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, desc: str, enabled: bool = True, initial: int = 0):
        self.enabled = enabled and total > 0
        self.t0 = time.perf_counter()
        self.images = 0
        self._bar = None
        if self.enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", leave=False,
                             dynamic_ncols=True, file=sys.stderr, mininterval=0.5)

    def update(self, images: int, **postfix: float) -> None:
        self.images += images
        if self._bar is not None:
            rate = self.images / max(time.perf_counter() - self.t0, 1e-9)
            shown = {k: f"{v:.4g}" for k, v in postfix.items()}
            self._bar.set_postfix(img_s=f"{rate:,.0f}", **shown, refresh=False)
            self._bar.update(1)

    @property
    def images_per_second(self) -> float:
        return self.images / max(time.perf_counter() - self.t0, 1e-9)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
