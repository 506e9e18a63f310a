"""The one progress helper: a tqdm bar on standard error when asked for, a no-op otherwise."""
from __future__ import annotations

import sys


def progress_bar(iterable=None, *, enabled: bool = True, **kwargs):
    """``tqdm(iterable, **kwargs)`` writing to stderr, or a silent stand-in with the same methods."""
    if not enabled:
        return _NoBar(iterable)
    from tqdm.auto import tqdm

    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


def progress_write(line: str) -> None:
    """Print ``line`` to stderr above any running bar."""
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stderr)


class _NoBar:
    def __init__(self, iterable=None):
        self._iterable = iterable
        self.n = 0

    def __iter__(self):
        return iter(self._iterable if self._iterable is not None else ())

    def update(self, n=1):
        self.n += n

    def set_postfix_str(self, *_args, **_kwargs):
        pass

    def close(self):
        pass
