"""The names of the files in a run directory, shared by the stages that write them and
the report that reads them (so neither imports the other), and the states a cell can be in."""
from enum import Enum


DONE = "done.json"  # <run_dir>/<stage>/done.json: the stage's summary; its presence marks it complete
MODEL = "model.pt"  # <run_dir>/<stage>/model.pt: the final weights, fp32 state dict
FEATURES = "features.npz"  # <run_dir>/<stage>/features.npz: backbone features for the report's map
CONFIG = "config.yaml"  # <run_dir>/config.yaml: the resolved config
SUMMARY = "summary.json"  # <run_dir>/summary.json: every stage's figures, written by the report
REPORT = "report.md"  # <run_dir>/report.md: the human report
METRICS = "metrics.jsonl"  # <run_dir>/metrics.jsonl: every record of the run
LEADERBOARD = "leaderboard.md"  # <sweep_dir>/leaderboard.md (and .csv beside it): the sweep's table
SWEEP_INDEX = "cells.json"  # <sweep_dir>/cells.json: a sweep's cells, their values, run dirs and statuses
# <sweep_dir>/cells/<name>/status.json: one cell's status (running, done, failed), written by
# whoever runs the cell (the local sweep or its Slurm array task); cells.json is rebuilt from these
CELL_STATUS = "status.json"
# done.json's ``defense`` of the no-defense baseline (the leaderboard measures every other
# defense against it), and ``attack.name`` of a clean run.
NO_DEFENSE = "none"
NO_ATTACK = "none"
CELL_ERROR = "error.txt"  # <sweep_dir>/cells/<name>/error.txt: the traceback of the cell's last failure


class Status(str, Enum):
    """The state of a sweep cell (``status.json``, ``cells.json``) and of a leaderboard
    row's cells. The values are the strings those files hold, so files written before
    this enum existed read the same."""

    PENDING = "pending"  # in the grid, never started
    RUNNING = "running"  # started; a kill leaves it so until the next run
    DONE = "done"
    FAILED = "failed"
    UNFINISHED = "unfinished"  # leaderboard: started (some stages done), not finished, not failed
    NOT_RUN = "not run"  # leaderboard: nothing of it on disk

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)
