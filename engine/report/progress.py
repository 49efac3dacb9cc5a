"""Progress on rank 0: a tqdm bar on a terminal, one plain line every few seconds
elsewhere (a log file, a Slurm ``--output``, CI), never carriage-return frames."""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


class Progress:
    def __init__(self, total: int, desc: str, enabled: bool = True, initial: int = 0, *,
                 interval_s: float = 30.0, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.enabled = enabled and total > 0
        self.total, self.desc, self.step = total, desc, initial
        self.interval_s = float(interval_s)
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.t0 = self._t_line = clock()
        self.images = 0
        self._postfix: dict[str, float] = {}
        self._bar = None
        self._plain = self.enabled and not _is_terminal(self.stream)
        if self.enabled and not self._plain:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", leave=False,
                             dynamic_ncols=True, file=self.stream, mininterval=0.5)

    def update(self, images: int, **postfix: float) -> None:
        self.images += images
        self.step += 1
        if self._bar is not None:
            rate = self.images / max(self.clock() - self.t0, 1e-9)
            shown = {k: f"{v:.4g}" for k, v in postfix.items()}
            self._bar.set_postfix(img_s=f"{rate:,.0f}", **shown, refresh=False)
            self._bar.update(1)
        elif self._plain:
            self._postfix.update(postfix)
            if self.clock() - self._t_line >= self.interval_s:
                self._line()

    def _line(self) -> None:
        now = self.clock()
        self._t_line = now
        elapsed = max(now - self.t0, 1e-9)
        parts = [f"[{self.desc}] step {self.step}/{self.total} ({100 * self.step / self.total:.0f}%)",
                 f"{self.images / elapsed:,.0f} img/s"]
        parts += [f"{k} {v:.4g}" for k, v in self._postfix.items()]
        print(", ".join(parts), file=self.stream, flush=True)

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.clock() - self.t0, 1e-9)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or file-like stream without a tty
        return False
