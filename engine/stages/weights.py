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


# Wrappers a checkpoint written elsewhere may carry around the model's own keys
# (DataParallel/DDP's ``module.``, a training script's ``model.`` or ``net.``).
_WRAPPER_PREFIXES = ("module.", "model.", "net.")


def fit_checkpoint(module: torch.nn.Module, path, what: str) -> None:
    """Load a checkpoint written by anyone into ``module``: a state dict, or a dict holding
    one under ``state_dict``/``model``; a wrapper prefix on every key is dropped. Anything
    that does not fit is one UserError naming the first parameter that differs and
    ``what`` (the config settings that decide the model's shape)."""
    from engine.errors import UserError

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint not found: {path}") from None
    except Exception as e:  # a truncated file, a pickle that is not plain tensors
        raise UserError(f"{path} is not a readable checkpoint: {e}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} holds no state dict of tensors")
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    own = module.state_dict()
    for name, tensor in own.items():
        if name not in state:
            raise UserError(f"{path} does not fit {what}: it has no parameter {name!r}")
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise UserError(f"{path} does not fit {what}: parameter {name!r} is {tuple(state[name].shape)} in the "
                            f"checkpoint but {tuple(tensor.shape)} in the model")
    extra = sorted(set(state) - set(own))
    if extra:
        raise UserError(f"{path} does not fit {what}: the model has no parameter {extra[0]!r}")
    module.load_state_dict(state)
