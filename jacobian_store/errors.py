"""Errors of the Jacobian store, in a module of their own so that every store module can raise them."""


class StoreError(RuntimeError):
    """A store that cannot be used as asked: missing, unfinished, locked, or built from another spec."""
