"""Activation names: ``model.layers.N.mlp|attn|output`` <-> (layer, component).

``model.layers.N.mlp`` is the MLP output, ``model.layers.N.attn`` the self-attention
output (also ``.self_attn``) and ``model.layers.N.output`` the residual stream after
layer N (also ``model.layers.N``, ``.resid``...). One parser for traces, the cache,
evals and steering, so every bad name gets the same one-line error.
"""

from __future__ import annotations

import re

from saelab.config import COMPONENT_ALIASES, COMPONENTS, canonical_component

Key = tuple[int, str]
"""(layer, canonical component)."""

_NAME = re.compile(r"model\.layers\.(-?\d+)(?:\.(\w+))?")
_EXTRA_ALIASES = {None: "output", "self_attn": "attn"}


def activation_name(layer: int, component: str) -> str:
    """The canonical activation name, e.g. ``activation_name(10, "mlp") == "model.layers.10.mlp"``."""
    return f"model.layers.{int(layer)}.{canonical_component(component)}"


class ActivationNameError(KeyError, ValueError):
    """An activation name that is malformed, out of range or was not captured.

    A ValueError (bad input) and a KeyError (so ``Mapping.get``/``in`` behave)."""

    def __str__(self) -> str:
        return str(self.args[0])


def parse_name(name: str, n_layers: int) -> Key:
    """(layer, canonical component) of an activation name, or ActivationNameError."""
    m = _NAME.fullmatch(name) if isinstance(name, str) else None
    comps = sorted(set(COMPONENTS) | set(COMPONENT_ALIASES) | {"self_attn"})
    valid = (f"model.layers.N.{{{','.join(comps)}}} or model.layers.N (= .output), "
             f"N in 0..{n_layers - 1}")
    comp = _EXTRA_ALIASES.get(m[2], m[2]) if m else None
    if comp is not None and comp not in COMPONENTS:
        comp = COMPONENT_ALIASES.get(comp)
    if m is None or comp is None:
        raise ActivationNameError(f"activation name {name!r} is not valid; valid names: {valid}")
    layer = int(m[1])
    if not 0 <= layer < n_layers:
        raise ActivationNameError(f"activation name {name!r}: layer {layer} is out of range; "
                                  f"valid layers: 0..{n_layers - 1} (the model has {n_layers})")
    return layer, comp
