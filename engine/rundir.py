"""The names of the files in a run directory, shared by the stages that write them and
the report that reads them (so neither imports the other)."""

DONE = "done.json"  # <run_dir>/<stage>/done.json: the stage's summary; its presence marks it complete
MODEL = "model.pt"  # <run_dir>/<stage>/model.pt: the final weights, fp32 state dict
FEATURES = "features.npz"  # <run_dir>/<stage>/features.npz: backbone features for the report's map
CONFIG = "config.yaml"  # <run_dir>/config.yaml: the resolved config
METRICS = "metrics.jsonl"  # <run_dir>/metrics.jsonl: every record of the run
SWEEP_INDEX = "cells.json"  # <sweep_dir>/cells.json: a sweep's cells, their values, run dirs and statuses
# <sweep_dir>/cells/<name>/status.json: one cell's status (running, done, failed), written by
# whoever runs the cell (the local sweep or its Slurm array task); cells.json is rebuilt from these
CELL_STATUS = "status.json"
CELL_ERROR = "error.txt"  # <sweep_dir>/cells/<name>/error.txt: the traceback of the cell's last failure
