"""Loading an earlier stage's weights into a stage's model."""
from __future__ import annotations

import torch


def load_weights(module: torch.nn.Module, path, prefix: str = "", strict_prefix: bool = True) -> None:
    """Load ``path`` (a state dict) into ``module``; with ``prefix`` only those keys."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if prefix:
        state = {k: v for k, v in state.items() if k.startswith(prefix)}
        missing, unexpected = module.load_state_dict(state, strict=False)
        missing = [k for k in missing if k.startswith(prefix)]
        if strict_prefix and (missing or unexpected):
            raise RuntimeError(f"{path}: {prefix}* weights do not fit the model "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    else:
        module.load_state_dict(state)
