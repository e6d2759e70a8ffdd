"""Which trials of a study matter and how their numbers read: the key metrics
shown everywhere, the one value formatter, and trial selection (the Pareto
set, the top N, or the best under a rule) shared by export, report and the
trials table.

Rule syntax (``saelab export --rule``)::

    RULE := ("min" | "max") NAME ["where" COND ("and" COND)*]
    COND := NAME ("<=" | "<" | ">=" | ">" | "==") NUMBER

NAME is a trial metric (``val/nmse``) or a swept parameter (``sae.k``), e.g.
``min val/nmse where val/dead_fraction<=0.05 and sae.k<=32``.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from typing import Any, Optional

import optuna
from optuna.trial import FrozenTrial, TrialState

from saelab.study import objectives_of

KEY_METRICS = ("val/nmse", "val/nmse_p99", "val/explained_variance", "val/l0",
               "val/dead_fraction", "val/delta_lm_loss", "val/ce_loss_score", "val/kl_div",
               "train/tokens", "time/wall_s")
"""Final metrics shown beside the objectives (trials table, summary.md, report table);
a trial without one (e.g. ``sae.downstream_eval=off``) shows an empty cell."""
DEFAULT_TOP = 3
"""Trials exported from a single-objective study without ``--top`` (a rule exports 1)."""
KEYWORDS = ("min", "max", "where", "and")
OPS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt, "==": operator.eq}


def fmt_value(v: Any) -> str:
    """A param or metric for a table cell: whole floats as integers, others to 4 significant digits."""
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() and abs(v) < 1e15 else f"{v:.4g}"
    return "" if v is None else str(v)


def trial_values(t: FrozenTrial) -> dict[str, Any]:
    """What a rule can name: the trial's params and final metrics."""
    return {**t.params, **t.user_attrs.get("metrics", {})}


@dataclass(frozen=True)
class Rule:
    """``min|max NAME [where NAME OP NUMBER [and ...]]`` (see the module docstring)."""

    direction: str
    name: str
    conditions: tuple[tuple[str, str, float], ...] = ()

    _TOKEN = re.compile(r"\s*(?:(<=|>=|==|<|>)|([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
                        r"|([A-Za-z_][\w./-]*))")

    @classmethod
    def parse(cls, text: str) -> "Rule":
        tokens, pos, text = [], 0, text.strip()
        while pos < len(text):
            m = cls._TOKEN.match(text, pos)
            if not m or m.end() == pos:
                raise ValueError(f"--rule={text!r}: unexpected {text[pos:].split()[0]!r} at "
                                 f"character {pos}; allowed: min|max NAME [where NAME OP NUMBER "
                                 "[and ...]] with OP one of <= < >= > ==")
            kind = "op" if m.group(1) else "num" if m.group(2) else "name"
            tokens.append((kind, m.group(m.lastindex)))
            pos = m.end()

        def take(i: int, kind: str, what: str, words: tuple[str, ...] = ()) -> str:
            if i >= len(tokens):
                raise ValueError(f"--rule={text!r}: ends where {what} was expected")
            k, v = tokens[i]
            if k != kind or (words and v not in words) or (not words and v in KEYWORDS):
                raise ValueError(f"--rule={text!r}: unexpected {v!r} (token {i + 1}); "
                                 f"expected {what}")
            return v

        direction = take(0, "name", "min or max", ("min", "max"))
        name = take(1, "name", "a metric or parameter name")
        conditions, i = [], 2
        while i < len(tokens):
            take(i, "name", "'where'" if i == 2 else "'and'", ("where",) if i == 2 else ("and",))
            conditions.append((take(i + 1, "name", "a metric or parameter name"),
                               take(i + 2, "op", "one of <= < >= > =="),
                               float(take(i + 3, "num", "a number"))))
            i += 4
        return cls(direction, name, tuple(conditions))

    def check_names(self, known: set[str]) -> None:
        for name in [self.name, *(c[0] for c in self.conditions)]:
            if name not in known:
                raise ValueError(f"--rule: unknown name {name!r}; allowed: {', '.join(sorted(known))}")

    def admits(self, values: dict[str, Any]) -> bool:
        def number(v: Any) -> bool:  # categorical values (component=mlp) never compare
            return isinstance(v, (int, float)) and math.isfinite(v)

        return number(values.get(self.name)) and all(
            number(values.get(n)) and OPS[op](values[n], x) for n, op, x in self.conditions)

    def __str__(self) -> str:
        conds = " and ".join(f"{n}{op}{x:g}" for n, op, x in self.conditions)
        return f"{self.direction} {self.name}" + (f" where {conds}" if conds else "")


def select_trials(study: optuna.Study, top: Optional[int] = None,
                  rule: Optional[str] = None) -> tuple[list[FrozenTrial], str]:
    """The trials to export and a one-line description of how they were chosen."""
    if top is not None and top < 1:
        raise ValueError(f"--top={top} is not valid; allowed: an integer >= 1")
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        states = sorted({t.state.name for t in study.get_trials(deepcopy=False)})
        raise ValueError(f"study {study.study_name!r} has no finished (COMPLETE) trial to export "
                         f"(trial states: {', '.join(states) or 'no trials'})")
    if rule is not None:
        parsed = Rule.parse(rule)
        parsed.check_names({k for t in done for k in trial_values(t)})
        ok = [t for t in done if parsed.admits(trial_values(t))]
        if not ok:
            raise ValueError(f"--rule={rule!r}: no finished trial satisfies it "
                             f"({len(done)} finished trials)")
        sign = 1 if parsed.direction == "min" else -1
        ok.sort(key=lambda t: (sign * trial_values(t)[parsed.name], t.number))
        return ok[: top or 1], f"rule: {parsed}"
    if len(study.directions) > 1:
        if top is not None:
            raise ValueError(f"--top={top} is not valid for the multi-objective study "
                             f"{study.study_name!r} (its Pareto set is exported); allowed: "
                             "--rule to pick by one metric")
        return sorted(study.best_trials, key=lambda t: t.number), "Pareto set (study.best_trials)"
    sign = 1 if study.direction == optuna.study.StudyDirection.MINIMIZE else -1
    ranked = sorted(done, key=lambda t: (sign * t.value, t.number))
    n = top or DEFAULT_TOP
    return ranked[:n], f"top {n} by {objectives_of(study)[0]}"
