"""What every artifact records about how it was made, and the one JSON encoding of records.

``jsonable`` turns the values records hold (NumPy and CuPy scalars and arrays, paths, nested
dicts) into JSON types: arrays larger than ``MAX_LIST_ELEMENTS`` become a summary (shape, dtype),
so a record never carries J-sized data. JSON has no non-finite numbers: by default NaN/±Inf
become the strings "nan"/"inf"/"-inf" (strict JSON); ``finite_only=False`` keeps them as the
``NaN``/``Infinity`` tokens Python's json reads back as floats (the experiment records, whose
readers compute with them). ``dumps`` and ``write_json_atomic`` use it.
"""
from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path

import numpy as np

MAX_LIST_ELEMENTS = 10_000


def _is_cupy_array(value) -> bool:
    return type(value).__module__.split(".")[0] == "cupy"


def jsonable(value, finite_only: bool = True):
    """``value`` as JSON types (see the module docstring); anything unknown becomes ``str(value)``."""
    if isinstance(value, dict):
        return {str(k): jsonable(v, finite_only) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, finite_only) for v in value]
    if isinstance(value, np.ndarray) or _is_cupy_array(value):
        if value.size > MAX_LIST_ELEMENTS:
            return {"omitted_array": True, "shape": list(value.shape), "dtype": str(value.dtype)}
        return jsonable((value.get() if _is_cupy_array(value) else value).tolist(), finite_only)
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) or not finite_only else str(value)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def dumps(value, finite_only: bool = True, **kwargs) -> str:
    """``json.dumps`` of ``jsonable(value, finite_only)``."""
    return json.dumps(jsonable(value, finite_only), allow_nan=not finite_only, **kwargs)


def write_json_atomic(path: str | os.PathLike, payload, finite_only: bool = True) -> None:
    """Write ``payload`` to a temporary file beside ``path``, fsync, then rename over ``path``:
    a reader sees the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(dumps(payload, finite_only, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def library_versions() -> dict:
    """Versions of lincnn, Python and the numerical libraries, and the CUDA torch was built for."""
    import h5py
    import scipy
    import torch

    try:
        from importlib.metadata import version

        lincnn = version("lincnn")
    except Exception:  # not installed (running from a checkout)
        lincnn = "unknown"
    return {"lincnn": lincnn, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "scipy": scipy.__version__, "h5py": h5py.__version__,
            "hdf5": h5py.version.hdf5_version, "cuda": torch.version.cuda if torch.cuda.is_available() else None}
