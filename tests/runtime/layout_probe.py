"""Started by a real launcher (tests/runtime/test_device_map.py): writes what this process's
environment says about its place on the node, and the GPU it would take with one GPU
visible per process and with one per local process, to ``OUT_DIR/rank<RANK>.json``."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from engine.runtime.device import detect_launcher, device_index, local_layout

if __name__ == "__main__":
    # The deepspeed launcher adds --local_rank=N before our own argument.
    out = Path(next(a for a in sys.argv[1:] if not a.startswith("--local")))
    launcher = detect_launcher()
    layout = local_layout(os.environ, launcher)
    rank = os.environ.get("RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or os.environ.get("PMI_RANK", "0")
    record = {"launcher": launcher, "local_rank": layout.local_rank, "local_world_size": layout.local_world_size,
              "index_one_visible": device_index(os.environ, 1), "index_all_visible": device_index(os.environ, 2)}
    (out / f"rank{rank}.json").write_text(json.dumps(record))
