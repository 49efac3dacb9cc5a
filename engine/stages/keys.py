"""What a stage's result depends on, as a hash: the key of a shared stage store.

Each stage declares ``depends_on`` beside its class: the dotted config keys its result
depends on, besides its own section (always included) and the stages it ``needs``
(whose keys are folded in, so a change upstream reruns everything below it). Two
entries are resolved rather than read verbatim:

- ``dataset``: the prepared dataset's content hash from ``meta.json`` (not
  ``data.root``: the same data under another path is the same input);
- ``attack``: the attack's shared settings and the chosen attack's own section only
  (``attack.blended`` cannot change a BadNets run); ``attack.implant_threshold`` is a
  report setting and is left out.

Keys outside every set (where the run is written, threads, progress, the launcher,
compile and CUDA tuning, checkpoint cadence) change how fast a result comes, not what
it is, so a stage store reuses a stage across them. The one runtime fact that changes
a result is the world size under ``distributed.batch_semantics: per_rank`` (the global
batch grows with it); it joins the key then.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from engine.stages.base import stage_class

# attack.* keys that are report settings, not inputs.
_ATTACK_REPORT_ONLY = ("implant_threshold",)


def _lookup(cfg: dict, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"stage dependency {dotted!r} is not a config key")
        node = node[part]
    return node


def _attack_inputs(attack: dict) -> dict:
    from engine.attacks import ATTACKS

    name = attack.get("name")
    if name not in ATTACKS:
        return {"name": name}  # a clean run: nothing else about the attack matters
    shared = {k: v for k, v in attack.items() if k not in ATTACKS and k not in _ATTACK_REPORT_ONLY}
    return {**shared, name: attack[name]}


def dependencies(cfg: dict, stage: str, *, dataset_hash: str, world_size: int = 1,
                 _seen: tuple[str, ...] = ()) -> dict:
    """The values stage ``stage``'s result depends on, from the plain-dict config ``cfg``
    (``engine.settings.to_dict``), upstream stages' keys included."""
    if stage in _seen:
        raise RuntimeError(f"stage dependency cycle: {' -> '.join(_seen + (stage,))}")
    cls = stage_class(stage)
    deps: dict[str, Any] = {"stage": stage}
    for dotted in dict.fromkeys((*cls.depends_on, stage)):
        if dotted == "dataset":
            deps[dotted] = dataset_hash
        elif dotted == "attack":
            deps[dotted] = _attack_inputs(_lookup(cfg, "attack"))
        else:
            deps[dotted] = _lookup(cfg, dotted)
    if _lookup(cfg, "distributed.batch_semantics") == "per_rank":
        deps["world_size"] = int(world_size)
    for upstream in cls.needs:
        deps[f"needs.{upstream}"] = stage_key(cfg, upstream, dataset_hash=dataset_hash, world_size=world_size,
                                              _seen=_seen + (stage,))
    return deps


def digest(deps: dict) -> str:
    text = json.dumps(deps, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def stage_key(cfg: dict, stage: str, *, dataset_hash: str, world_size: int = 1, _seen: tuple[str, ...] = ()) -> str:
    """A hex digest of exactly what stage ``stage`` depends on."""
    return digest(dependencies(cfg, stage, dataset_hash=dataset_hash, world_size=world_size, _seen=_seen))
