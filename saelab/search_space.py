"""The search space of a sweep: ``study.params`` and command-line sweep overrides
in Hydra's override grammar -> Optuna distributions, validated before any trial.

The grammar is hydra-optuna-sweeper's: ``sae.k=16,32``, ``choice(16,32)``,
``range(start, stop[, step])`` (stop excluded, like Python's), ``interval(lo, hi)``
and ``tag(log, interval(...))``. Every corner point of the space (all choices,
both ends of each range) is checked as a whole trial config (keys, values,
layer < n_layers, k <= expansion * d_model) so a bad sweep fails before it starts.
The Hydra sweeper (``hydra_plugins/saelab_sweeper``) is the adapter around this.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, Union

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from saelab.config import TrialConfig, canonical_component
from saelab.configs import trial_from_dict
from saelab.models import model_info
from saelab.trial import validate_trial

Distribution = Union[CategoricalDistribution, FloatDistribution, IntDistribution]

MAX_POINTS = 4096
"""Corner points validated one by one; larger spaces are checked per parameter."""


@dataclass
class SearchSpace:
    distributions: dict[str, Distribution] = field(default_factory=dict)
    """Config key -> optuna distribution."""
    fixed: list[str] = field(default_factory=list)
    """Overrides every trial gets unchanged (command-line values, groups, hydra.*)."""


def _distribution(override: Override) -> Distribution:
    """An optuna distribution from a sweep override (Hydra's grammar)."""
    key, value = override.get_key_element(), override.value()
    if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
        choices = list(override.sweep_iterator(transformer=Transformer.encode))
        if not choices:
            raise ValueError(f"{key}={override.input_line.split('=', 1)[1]} is empty; allowed: "
                             "one or more choices")
        return CategoricalDistribution(choices)
    if override.is_range_sweep():  # Hydra's range excludes stop, like Python's
        values = list(override.sweep_iterator())
        if not values:
            raise ValueError(f"{key}: range({value.start}, {value.stop}, {value.step}) is empty; "
                             "allowed: a range with at least one value")
        if all(isinstance(v, int) for v in values):
            return IntDistribution(values[0], values[-1], step=int(value.step))
        return FloatDistribution(float(values[0]), float(values[-1]), step=float(value.step))
    if override.is_interval_sweep():
        lo, hi, is_log = value.start, value.end, "log" in value.tags
        if not lo < hi or (is_log and lo <= 0):
            raise ValueError(f"{key}: interval({lo}, {hi}) is empty or invalid; allowed: start < end"
                             f"{' and start > 0 for tag(log, ...)' if is_log else ''}")
        if isinstance(lo, int) and isinstance(hi, int):
            return IntDistribution(lo, hi, log=is_log)
        return FloatDistribution(float(lo), float(hi), log=is_log)
    raise ValueError(f"{override.input_line}: sweep kind not supported; allowed: choice, range, "
                     "interval, tag(log, interval(...))")


def parse_search_space(params: Mapping[str, Any], arguments: Sequence[str]) -> SearchSpace:
    """``study.params`` then the command line; a later value for a key replaces
    an earlier one (``sae.k=32`` on the command line fixes a swept ``sae.k``)."""
    parser = OverridesParser.create()
    lines = [f"{k}={v}" for k, v in params.items()] + list(arguments)
    space = SearchSpace()
    fixed: dict[str, str] = {}
    for override in parser.parse_overrides(lines):
        key = override.get_key_element()
        space.distributions.pop(key, None)
        fixed.pop(key, None)
        if override.is_sweep_override():
            space.distributions[key] = _distribution(override)
        else:
            fixed[key] = override.input_line
    space.fixed = list(fixed.values())
    return space


def corner_values(dist: Distribution) -> list:
    """The values that bound a distribution (all choices, or both ends)."""
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    return [dist.low, dist.high] if dist.low != dist.high else [dist.low]


def grid_of(space: SearchSpace) -> dict[str, list]:
    """The GridSampler's grid; every parameter must be discrete."""
    grid = {}
    for key, d in space.distributions.items():
        if isinstance(d, CategoricalDistribution):
            grid[key] = list(d.choices)
        elif d.step is not None and not getattr(d, "log", False):
            n = int(round((d.high - d.low) / d.step)) + 1
            grid[key] = [type(d.low)(d.low + i * d.step) if isinstance(d, IntDistribution)
                         else d.low + i * d.step for i in range(n)]
        else:
            raise ValueError(f"{key}: study.sampler=grid needs discrete values; allowed: choice(...) "
                             f"or range(...), not {d}")
    return grid


def _set(d: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[last] = value


def validate_search_space(task: dict, space: SearchSpace, groups: Sequence[str] = ()) -> int:
    """Check every key exists and every corner point makes a valid trial
    (values, component, layer < n_layers, k <= expansion * d_model). Raises
    ValueError naming the key or point; returns the number of points checked."""
    keys = []
    for key in space.distributions:
        if key in groups:
            continue  # a config group choice: Hydra's composition checks it
        if key.startswith(("+", "~")) or key.startswith("hydra."):
            raise ValueError(f"{key}: only config values can be swept; allowed: keys of the trial "
                             "config such as sae.k, layer, component")
        if OmegaConf.select(OmegaConf.create(task), key, default="\0missing") == "\0missing":
            raise ValueError(f"{key} is not a key of the trial config; allowed: existing keys such "
                             "as sae.k, sae.expansion_factor, sae.learning_rate, layer, component")
        keys.append(key)
    corners = [corner_values(space.distributions[k]) for k in keys]
    if math.prod(map(len, corners)) <= MAX_POINTS:
        points = [dict(zip(keys, p)) for p in itertools.product(*corners)]
    else:  # one parameter at a time, plus the k/expansion extremes
        points = [{k: v} for k, c in zip(keys, corners) for v in c]
        dims = [k for k in ("sae.k", "sae.expansion_factor") if k in keys]
        if len(dims) == 2:
            ks, es = corners[keys.index("sae.k")], corners[keys.index("sae.expansion_factor")]
            points.append({"sae.k": max(ks), "sae.expansion_factor": min(es)})
    infos: dict[tuple, Any] = {}
    for point in points:
        d = copy.deepcopy(task)
        for k, v in point.items():
            _set(d, k, v)
        where = ", ".join(f"{k}={v}" for k, v in point.items()) or "the base config"
        try:
            cfg = trial_from_dict(d)
            mkey = (cfg.model.name, cfg.model.dtype)
            if mkey not in infos:
                infos[mkey] = model_info(cfg.model)
            validate_trial(cfg, infos[mkey])
        except (ValueError, TypeError) as e:
            raise ValueError(f"sweep point {where}: {e}") from e
    return len(points)


def capture_pairs(task: dict, space: SearchSpace
                  ) -> list[tuple[TrialConfig, list[tuple[int, str]]]]:
    """Every activation the study can need, to capture before its first trial: per
    (model, data, cache_dir) setting the space can produce, that setting's trial config
    and all the (layer, component) pairs the space can produce (one forward pass to the
    deepest fills them all). Swept ``model.*``/``data.*``/``cache_dir`` keys are
    enumerated when discrete (choices, integer ranges); empty when one is continuous, a
    ``model``/``data`` group is swept, or the cache directory is a per-job interpolation:
    trials then capture their own (still resumable, and shared through the cache's locks)."""
    def values(key: str) -> list | None:
        d = space.distributions.get(key)
        if key in ("model", "data"):  # a config-group choice: only Hydra composes it
            return None
        if d is None:
            return [OmegaConf.select(OmegaConf.create(task), key)]
        if isinstance(d, CategoricalDistribution):
            return list(d.choices)
        if isinstance(d, IntDistribution) and not d.log:
            return list(range(d.low, d.high + 1, d.step))
        return None

    setting = [k for k in space.distributions if k.split(".")[0] in ("model", "data", "cache_dir")]
    layers, comps = values("layer"), values("component")
    options = [values(k) for k in setting]
    if "${" in str(task.get("cache_dir")) or layers is None or comps is None or None in options:
        return []
    plan = []
    for point in itertools.product(*options):
        d = copy.deepcopy(task)
        for k, v in zip(setting, point, strict=True):
            _set(d, k, v)
        pairs = sorted({(int(layer), canonical_component(str(comp)))
                        for layer in layers for comp in comps})
        plan.append((trial_from_dict(d), pairs))
    return plan


def format_value(v: Any) -> str:
    """A sampled value as override text."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return repr(v)
    return str(v)


def trial_overrides(space: SearchSpace, values: Mapping[str, Any]) -> list[str]:
    """One trial's Hydra overrides: the fixed ones, then a value per swept key."""
    return space.fixed + [f"{k}={format_value(v)}" for k, v in values.items()]


def suggest(trial: optuna.Trial, space: SearchSpace) -> dict[str, Any]:
    """Sample one value per dimension of ``space`` (Optuna records them as the trial's params)."""
    out = {}
    for key, d in space.distributions.items():
        if isinstance(d, CategoricalDistribution):
            out[key] = trial.suggest_categorical(key, d.choices)
        elif isinstance(d, IntDistribution):
            out[key] = trial.suggest_int(key, d.low, d.high, step=d.step, log=d.log)
        else:
            out[key] = trial.suggest_float(key, d.low, d.high, step=d.step, log=d.log)
    return out
