"""The run directory: one JSON record per finished unit of work, written atomically.

Layout of ``runs/<name>/``::

    experiment.json          the resolved experiment (rewritten at every start; reports read it)
    records/<key>.json       one per finished unit: config, metrics, timings, versions
    search/<key>.json        one per finished hyperparameter-search trial (``--search``)
    train/<key>/             checkpoints of a training unit in progress (resumed after a kill)
    stores/<name>.h5         Jacobian stores (resumed chunk by chunk after a kill)
    report.md, figures/*.png the report, regenerated from the records alone

A unit's key names it (variant, model or solver, width, seed), and its record holds a digest of
every setting that determines its result, so a rerun skips a finished unit only when nothing that
matters changed, and refuses (naming the setting) when something did.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

from jacobian_store import provenance
from jacobian_store.provenance import library_versions

RECORD_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class Unit:
    variant: str
    name: str  # standard, linearized, lstsq, ridge, cg, rsvd, sgd, spectrum, <method>-path, solvers
    width: float
    seed: int
    n_train: int | None = None  # interpolation: the point's training-set size (else the dataset's)

    @property
    def key(self) -> str:
        return unit_key(self.variant, self.name, self.width, self.seed, self.n_train)


def unit_key(variant: str, name: str, width: float, seed: int, n_train: int | None = None) -> str:
    """Stable file-name key of a unit, e.g. ``mnist__linearized__w4__s0`` (``__n1000`` appended for an
    interpolation point)."""
    n = "" if n_train is None else f"__n{n_train}"
    return f"{_safe(variant)}__{_safe(name)}__w{width:g}__s{seed}{n}"


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-._" else "-" for c in str(text))


def settings_digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_json_atomic(path: Path, payload: dict) -> None:
    """``provenance.write_json_atomic``, keeping NaN (a diverged run's loss) a number readers compute with."""
    provenance.write_json_atomic(path, payload, finite_only=False)


def make_record(key: str, unit: dict, settings: dict, metrics: dict, seconds: float, **extra) -> dict:
    return {"format": RECORD_FORMAT, "key": key, "unit": unit, "settings": settings,
            "settings_digest": settings_digest(settings), "metrics": metrics, "seconds": seconds,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": socket.gethostname(),
            "versions": library_versions(), **extra}


def read_record(path: Path) -> dict | None:
    """The record at ``path``, or None when there is none (or only a torn temporary file)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def load_records(run_dir: Path, folder: str = "records") -> list[dict]:
    """Every finished record of the run directory, sorted by key."""
    directory = Path(run_dir) / folder
    if not directory.is_dir():
        return []
    return [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))]


class Clock:
    """``with Clock() as c: ...``; ``c.seconds`` afterwards."""

    def __enter__(self):
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._start
