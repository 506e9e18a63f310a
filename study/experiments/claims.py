"""Claims an experiment tests, declared in its TOML as checks on its records, and their verdicts.

An experiment file lists its claims as ``[[claims]]`` tables (a preset may replace the list)::

    [[claims]]
    claim = "standard nets beat their linearizations at every width"   # the sentence reported
    kind = "compare"                      # compare | trend | drop | location
    a = "standard.test_acc"               # a metric expression (below)
    op = ">"                              # >, >=, <, <=
    b = "linearized.test_acc"             # another expression, or a number ("lstsq.train_acc >= 1.0")
    at = "every"                          # which points of the sweep (below); compare only
    b_at = "smallest"                     # optional: b at this one point, against a at each of at's
    along = "width"                       # the sweep: "width" (default) or "n_train"
    margin = 0.0                          # the smallest difference that counts (metric units)

**Metric expressions** name a unit of the grid and a metric of its records, optionally a variant
and a difference: ``standard.test_acc``, ``solvers.lstsq.u_norm`` (a path into nested metrics),
``mnist-shifted:standard.test_acc - mnist-shifted:linearized.test_acc``. An expression without a
variant is evaluated on every variant of the experiment (the claim must hold on each); one with a
variant only on that one. A difference is paired by seed.

**Points**: the records at each value of the sweep axis (width, or n_train for the n-sweep of an
``interpolation`` experiment; records off the sweep are left out). ``at`` = ``"every"`` (the claim
must hold at each point), ``"smallest"``, ``"largest"``, a number (that axis value), or
``"argmin:EXPR"`` / ``"argmax:EXPR"`` (the point where the seed mean of EXPR is smallest/largest).

**Kinds**, each reducing the records to one number d_s per seed s:

- ``compare``: d_s = a_s − b_s at a point; the claim is ``d op margin`` (``<``: −d > margin). With
  ``b_at``, b is taken at that one point (e.g. "a wide linearization beats the narrowest standard
  net": a = linearized.test_acc at "largest", b = standard.test_acc, b_at = "smallest").
- ``trend``: ``direction = "increases" | "decreases"``: d_s = the least-squares slope of a_s against
  log(axis) over the points (every point where seed s has a value; at least two).
- ``drop``: d_s = the largest fall of a_s along the axis, max over i < j of a_s(x_i) − a_s(x_j)
  (0 for a non-decreasing curve); compared with ``op`` and the number ``b``: a dip is
  ``drop > 0.05``, no dip ``drop < 0.01``.
- ``location``: ``extreme = "min" | "max"`` of a along the axis, per seed; the claim is that the
  expression ``x`` at that point lies ``within = [lo, hi]``: holds when it does for every seed,
  fails when it does for none, else inconclusive.

**Verdict rule** (compare, trend, drop): with n ≥ 2 seeds, d̄ = mean of d_s and SE = sd(d_s)/√n
(sample sd): the claim **holds** when d̄ − 2·SE clears the margin on the claimed side, **fails**
when d̄ + 2·SE does not reach it, and is **inconclusive** when the ±2 SE interval straddles it (the
seeds' spread covers the difference). With one seed the spread is unknown: the sign of d̄ beyond
the margin decides, and the evidence says "1 seed". Strict ``>``/``<`` fail at equality, ``>=``/``<=``
hold there. ``at = "every"`` (and an expression over several variants) holds when every point
holds, fails when any point fails, else is inconclusive. No records at a point: inconclusive.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Z = 2.0  # the ±Z·SE interval of the verdict rule
CLAIM_KINDS = ("compare", "trend", "drop", "location")
OPS = (">", ">=", "<", "<=")
AXES = ("width", "n_train")
HOLDS, FAILS, INCONCLUSIVE = "holds", "fails", "inconclusive"

# Keys of a [[claims]] table and their types; "claim", "kind" and "a" are required.
CLAIM_KEYS = {"claim": (str,), "kind": (str,), "a": (str,), "op": (str,), "b": (str, int, float),
              "at": (str, int, float), "b_at": (str, int, float), "along": (str,), "margin": (int, float), "direction": (str,),
              "extreme": (str,), "x": (str,), "within": (list,)}

_MODEL_METRICS = ("train_acc", "test_acc", "train_loss", "test_loss", "distance", "w0_norm", "n_parameters",
                  "epochs")
_SOLVER_METRICS = ("train_acc", "test_acc", "train_loss", "test_loss", "u_norm", "residual_norm",
                   "relative_residual", "n_parameters", "rank")
_SPECTRUM_METRICS = ("effective_rank", "effective_rank_unfiltered", "numerical_rank", "condition_number",
                     "stable_rank", "sigma_max", "sigma_min", "n_rows", "n_parameters")
# The interpolation experiment's "solvers" unit: the spectrum of J, then one block per method.
INTERPOLATION_METHODS = ("lstsq", "ridge_val", "ridge_gcv", "cg_val")
_POINT_METRICS = ("train_acc", "test_acc", "val_acc", "u_norm", "relative_residual", "lambda", "iterations")
_INTERPOLATION_SOLVER_METRICS = ("n_rows", "n_parameters", "numerical_rank", "effective_rank", "reference_rank",
                                 "rows_per_rank", *(f"{m}.{k}" for m in INTERPOLATION_METHODS for k in _POINT_METRICS))


def unit_metrics(exp) -> dict[str, tuple[str, ...]]:
    """unit name → the metrics a claim may name, for the units this experiment runs."""
    if exp.kind == "compare":
        return {**{m: _MODEL_METRICS for m in exp.grid["models"]}, **{s: _SOLVER_METRICS for s in exp.grid["solvers"]}}
    if exp.kind == "spectrum":
        return {"spectrum": _SPECTRUM_METRICS}
    if exp.kind == "interpolation":
        return {**{m: _MODEL_METRICS for m in exp.grid["models"]}, "solvers": _INTERPOLATION_SOLVER_METRICS}
    return {"lstsq": _SOLVER_METRICS}  # regularization: the paths are lists, the lstsq reference is a point


class ClaimError(ValueError):
    """A claim that cannot be checked: unknown kind, unit, metric or variant."""


# -------------------------------------------------------------------------------------------------
# expressions


@dataclass(frozen=True)
class Term:
    variant: str | None
    unit: str
    metric: str  # a dotted path into the record's metrics

    def __str__(self):
        return f"{self.variant + ':' if self.variant else ''}{self.unit}.{self.metric}"


def parse_expression(text: str) -> tuple[Term, ...]:
    """``[variant:]unit.metric`` or a difference of two, separated by " - " (spaces required, since
    names such as mnist-shifted contain hyphens)."""
    parts = [p.strip() for p in str(text).split(" - ")]
    if len(parts) > 2 or not all(parts):
        raise ClaimError(f"expression {text!r}: write 'unit.metric' or 'unit.metric - unit.metric' "
                         f"(optionally 'variant:unit.metric')")
    terms = []
    for part in parts:
        variant, _, rest = part.rpartition(":")
        unit, dot, metric = rest.partition(".")
        if not dot or not unit or not metric:
            raise ClaimError(f"expression {text!r}: {part!r} is not 'unit.metric' (e.g. 'standard.test_acc')")
        terms.append(Term(variant or None, unit, metric))
    return tuple(terms)


def validate_claims(exp) -> None:
    """Raise ClaimError naming the first claim of ``exp`` that cannot be checked, and the valid choices."""
    metrics = unit_metrics(exp)
    labels = [v["label"] for v in exp.variants]
    for i, claim in enumerate(exp.claims):
        where = f"claims[{i}] ({claim.get('claim', '?')!r})"
        for key, value in claim.items():
            if key not in CLAIM_KEYS:
                raise ClaimError(f"{where}: unknown key {key!r}; valid keys: {', '.join(CLAIM_KEYS)}")
            if isinstance(value, bool) or not isinstance(value, CLAIM_KEYS[key]):
                raise ClaimError(f"{where}: {key!r} has the wrong type ({value!r})")
        for key in ("claim", "kind", "a"):
            if key not in claim:
                raise ClaimError(f"{where}: needs {key!r}")
        kind = claim["kind"]
        if kind not in CLAIM_KINDS:
            raise ClaimError(f"{where}: unknown claim kind {kind!r}; valid kinds: {', '.join(CLAIM_KINDS)}")
        if claim.get("along", "width") not in AXES:
            raise ClaimError(f"{where}: along must be one of {', '.join(AXES)}, got {claim['along']!r}")
        if claim.get("along") == "n_train" and exp.kind != "interpolation":
            raise ClaimError(f"{where}: along = 'n_train' needs an interpolation experiment (its n-sweep)")
        required = {"compare": ("op", "b"), "trend": ("direction",), "drop": ("op", "b"),
                    "location": ("extreme", "x", "within")}[kind]
        for key in required:
            if key not in claim:
                raise ClaimError(f"{where}: a {kind} claim needs {key!r}")
        if "op" in claim and claim["op"] not in OPS:
            raise ClaimError(f"{where}: op must be one of {', '.join(OPS)}, got {claim['op']!r}")
        if kind == "trend" and claim["direction"] not in ("increases", "decreases"):
            raise ClaimError(f"{where}: direction must be 'increases' or 'decreases', got {claim['direction']!r}")
        if kind == "drop" and not isinstance(claim["b"], (int, float)):
            raise ClaimError(f"{where}: a drop claim compares with a number b (e.g. b = 0.05)")
        if kind == "location":
            if claim["extreme"] not in ("min", "max"):
                raise ClaimError(f"{where}: extreme must be 'min' or 'max', got {claim['extreme']!r}")
            w = claim["within"]
            if len(w) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in w) or w[0] > w[1]:
                raise ClaimError(f"{where}: within must be [lo, hi] with lo ≤ hi, got {w!r}")
        expressions = [claim["a"]] + [claim[k] for k in ("b", "x") if isinstance(claim.get(k), str)]
        if "b_at" in claim and (kind != "compare" or not isinstance(claim["b"], str) or claim["b_at"] == "every"):
            raise ClaimError(f"{where}: b_at picks one point of the expression b of a compare claim")
        for key in ("at", "b_at"):
            at = claim.get(key, "every")
            if isinstance(at, str) and at not in ("every", "smallest", "largest"):
                extreme, colon, expression = at.partition(":")
                if extreme not in ("argmin", "argmax") or not colon:
                    raise ClaimError(f"{where}: {key} must be 'every', 'smallest', 'largest', an axis value, or "
                                     f"'argmin:EXPR' / 'argmax:EXPR'; got {at!r}")
                expressions.append(expression)
        for text in expressions:
            try:
                terms = parse_expression(text)
            except ClaimError as err:
                raise ClaimError(f"{where}: {err}") from None
            for term in terms:
                if term.variant is not None and term.variant not in labels:
                    raise ClaimError(f"{where}: unknown variant {term.variant!r}; variants: {', '.join(labels)}")
                if term.unit not in metrics:
                    raise ClaimError(f"{where}: {term.unit!r} is not a unit this experiment runs; units: "
                                     f"{', '.join(metrics)}")
                if term.metric not in metrics[term.unit]:
                    raise ClaimError(f"{where}: unknown metric {term.metric!r} of {term.unit}; valid metrics: "
                                     f"{', '.join(metrics[term.unit])}")


# -------------------------------------------------------------------------------------------------
# evaluation


def _axis_value(record: dict, along: str):
    return record["unit"].get(along) if along == "n_train" else record["unit"]["width"]


def _on_sweep(exp, record: dict, along: str) -> bool:
    """Whether ``record`` lies on the sweep along ``along``: the other coordinate at its fixed value."""
    if exp.kind != "interpolation":
        return True
    sweep = exp.interpolation
    if along == "n_train":
        return record["unit"]["width"] == sweep["width"]
    return record["unit"].get("n_train") == sweep["n_train"]


def _lookup(metrics: dict, path: str):
    value = metrics
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class _Data:
    """Record values by (variant, unit, axis value, seed) on one sweep."""

    def __init__(self, exp, records: list[dict], along: str):
        self.along = along
        self.values: dict[tuple, dict] = {}
        for r in records:
            if not _on_sweep(exp, r, along):
                continue
            u = r["unit"]
            self.values[(u["variant"], u["name"], _axis_value(r, along), u["seed"])] = r["metrics"]

    def series(self, terms: tuple[Term, ...], variant: str) -> dict:
        """axis value → {seed: value} of the expression on ``variant`` (a difference: seeds in both)."""
        out = {}
        for term in terms:
            v = term.variant or variant
            part = {}
            for (rv, unit, x, seed), metrics in self.values.items():
                if rv == v and unit == term.unit:
                    value = _lookup(metrics, term.metric)
                    if value is not None and math.isfinite(value):
                        part.setdefault(x, {})[seed] = value
            if not out:
                out = part
                continue
            out = {x: {s: out[x][s] - part[x][s] for s in out[x] if s in part.get(x, {})} for x in out if x in part}
        return {x: seeds for x, seeds in out.items() if seeds}


def _decide(d: list[float], op: str, margin: float) -> tuple[str, str]:
    """The verdict on per-seed values d (module docstring) and its numbers."""
    d = np.asarray(d, dtype=np.float64)
    mean = float(d.mean())
    e = mean - margin if op.startswith(">") else -mean - margin  # > 0 on the claimed side
    if d.size >= 2:
        se = float(d.std(ddof=1) / math.sqrt(d.size))
        numbers = f"{mean:.4g} ± {se:.2g} (mean ± SE, {d.size} seeds)"
    else:
        se = 0.0
        numbers = f"{mean:.4g} (1 seed: spread unknown)"
    strict = op in (">", "<")
    low, high = e - Z * se, e + Z * se
    if (low > 0) if strict else (low >= 0):
        return HOLDS, numbers
    if (high <= 0) if strict else (high < 0):
        return FAILS, numbers
    return INCONCLUSIVE, numbers


def _combine(verdicts: list[str]) -> str:
    if not verdicts:
        return INCONCLUSIVE
    if FAILS in verdicts:
        return FAILS
    return HOLDS if all(v == HOLDS for v in verdicts) else INCONCLUSIVE


def _fmt_x(along: str, x) -> str:
    return f"{'n' if along == 'n_train' else 'width'} {x:g}"


def _points(claim: dict, data: _Data, a_series: dict, variant: str, key: str = "at") -> list:
    at = claim.get(key, "every")
    xs = sorted(a_series)
    if not xs:
        return []
    if at == "every":
        return xs
    if at == "smallest":
        return xs[:1]
    if at == "largest":
        return xs[-1:]
    if isinstance(at, (int, float)):
        return [x for x in xs if float(x) == float(at)]
    extreme, _, expression = at.partition(":")
    ref = data.series(parse_expression(expression), variant)
    means = {x: float(np.mean(list(s.values()))) for x, s in ref.items() if x in a_series}
    if not means:
        return []
    return [(min if extreme == "argmin" else max)(means, key=means.get)]


def _slope(points: dict[float, float]) -> float:
    x = np.log(np.asarray(list(points), dtype=np.float64))
    y = np.asarray(list(points.values()), dtype=np.float64)
    return float(np.polyfit(x, y, 1)[0])


def _largest_drop(points: dict[float, float]) -> float:
    values = [points[x] for x in sorted(points)]
    best, peak = 0.0, -math.inf
    for v in values:
        peak = max(peak, v)
        best = max(best, peak - v)
    return best


def _per_seed_curves(series: dict) -> dict[int, dict]:
    curves: dict[int, dict] = {}
    for x, seeds in series.items():
        for seed, value in seeds.items():
            curves.setdefault(seed, {})[x] = value
    return curves


def _variants_of(claim: dict, exp) -> list[str]:
    texts = [claim["a"]] + [claim[k] for k in ("b", "x") if isinstance(claim.get(k), str)]
    named = {t.variant for text in texts for t in parse_expression(text)}
    if None in named or not named:
        return [v["label"] for v in exp.variants]
    return [sorted(named)[0]]  # every term names its variant: evaluate once


def _evaluate_on(claim: dict, exp, data: _Data, variant: str) -> tuple[str, str]:
    kind, along = claim["kind"], claim.get("along", "width")
    a = data.series(parse_expression(claim["a"]), variant)
    if not a:
        return INCONCLUSIVE, f"no records of {claim['a']}"
    margin = float(claim.get("margin", 0.0))
    if kind == "compare":
        b_text = claim["b"]
        if isinstance(b_text, str):
            b = data.series(parse_expression(b_text), variant)
        else:
            b = {x: {s: float(b_text) for s in seeds} for x, seeds in a.items()}
        b_label = "b"
        if "b_at" in claim:
            [b_x] = _points(claim, data, b, variant, "b_at") or [None]
            b = {x: b.get(b_x, {}) for x in a}
            b_label = f"b ({_fmt_x(along, b_x) if b_x is not None else 'no point'})"
        verdicts, parts = [], []
        for x in _points(claim, data, a, variant):
            seeds = sorted(set(a.get(x, {})) & set(b.get(x, {})))
            if not seeds:
                verdicts.append(INCONCLUSIVE)
                parts.append(f"{_fmt_x(along, x)}: no paired records")
                continue
            verdict, numbers = _decide([a[x][s] - b[x][s] for s in seeds], claim["op"], margin)
            b_mean = float(np.mean([b[x][s] for s in seeds]))
            a_mean = float(np.mean([a[x][s] for s in seeds]))
            verdicts.append(verdict)
            parts.append(f"{_fmt_x(along, x)}: a = {a_mean:.4g}, {b_label} = {b_mean:.4g}, a − b = {numbers} → {verdict}")
        if not parts:
            return INCONCLUSIVE, f"no point matches at = {claim.get('at')!r}"
        return _combine(verdicts), "; ".join(parts)
    curves = _per_seed_curves(a)
    means = ", ".join(f"{_fmt_x(along, x)}: {np.mean(list(a[x].values())):.4g}" for x in sorted(a))
    if kind == "trend":
        slopes = [_slope(c) for c in curves.values() if len(c) >= 2]
        if not slopes:
            return INCONCLUSIVE, f"fewer than two points ({means})"
        verdict, numbers = _decide(slopes, ">" if claim["direction"] == "increases" else "<", margin)
        return verdict, f"{means}; slope per log({along}) = {numbers}"
    if kind == "drop":
        drops = [_largest_drop(c) for c in curves.values()]
        verdict, numbers = _decide([d - float(claim["b"]) for d in drops], claim["op"], margin)
        return verdict, (f"{means}; largest drop {np.mean(drops):.4g} (per seed: "
                         f"{', '.join(f'{d:.4g}' for d in drops)}); drop − {claim['b']:g} = {numbers}")
    # location
    x_series = data.series(parse_expression(claim["x"]), variant)
    lo, hi = (float(v) for v in claim["within"])
    inside, parts = [], []
    for seed, curve in sorted(curves.items()):
        at = (min if claim["extreme"] == "min" else max)(curve, key=curve.get)
        where = x_series.get(at, {}).get(seed)
        if where is None:
            parts.append(f"seed {seed}: {claim['extreme']} at {_fmt_x(along, at)}, {claim['x']} unknown")
            continue
        inside.append(lo <= where <= hi)
        parts.append(f"seed {seed}: {claim['extreme']} {curve[at]:.4g} at {_fmt_x(along, at)}, "
                     f"{claim['x']} = {where:.3g}")
    verdict = INCONCLUSIVE if not inside else HOLDS if all(inside) else FAILS if not any(inside) else INCONCLUSIVE
    return verdict, f"{'; '.join(parts)} (claimed within [{lo:g}, {hi:g}]); curve {means}"


def evaluate_claims(exp, records: list[dict]) -> list[dict]:
    """``[{"claim", "verdict", "evidence", "kind"}]`` for every claim of ``exp`` on ``records``."""
    out = []
    for claim in exp.claims:
        data = _Data(exp, records, claim.get("along", "width"))
        variants = _variants_of(claim, exp)
        verdicts, evidence = [], []
        for variant in variants:
            verdict, text = _evaluate_on(claim, exp, data, variant)
            verdicts.append(verdict)
            evidence.append(text if len(variants) == 1 else f"[{variant}] {text} → {verdict}")
        out.append({"claim": claim["claim"], "verdict": _combine(verdicts), "evidence": " | ".join(evidence),
                    "kind": claim["kind"], "check": _describe(claim)})
    return out


def _describe(claim: dict) -> str:
    kind = claim["kind"]
    along = claim.get("along", "width")
    margin = f" + {claim['margin']:g}" if claim.get("margin") else ""
    if kind == "compare":
        b_at = f" (b at {claim['b_at']} {along})" if "b_at" in claim else ""
        return f"{claim['a']} {claim['op']} {claim['b']}{margin} at {claim.get('at', 'every')} {along}{b_at}"
    if kind == "trend":
        return f"{claim['a']} {claim['direction']} with {along}"
    if kind == "drop":
        return f"largest drop of {claim['a']} along {along} {claim['op']} {claim['b']:g}"
    return f"{claim['extreme']} of {claim['a']} along {along} where {claim['x']} ∈ [{claim['within'][0]:g}, {claim['within'][1]:g}]"


RULE = ("Verdicts: per seed, the claim's difference d (a − b at a point, the slope of a against log of the "
        "sweep axis, or the largest drop of a along the sweep, less the claimed bound); with n ≥ 2 seeds "
        "the claim holds when mean(d) − 2·SE clears the bound on the claimed side (SE = sd/√n), fails when "
        "mean(d) + 2·SE does not reach it, and is inconclusive when the seeds' spread covers the difference; "
        "with one seed the sign decides (spread unknown). 'Every' point: holds when all hold, fails when "
        "any fails. Location claims hold when every seed's extreme lies in the range, fail when none does.")
