"""What Dynamo warns about while tracing: the library's calls must give it nothing."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def dynamo_warnings() -> Iterator[list[str]]:
    """The messages of the warnings Dynamo raised in the block (code it could not trace),
    in the list yielded, filled when the block ends. Left out: Dynamo's note on the
    interpreter itself, at each guard built on Python 3.13.0 (a CPython bug it works around,
    fixed in 3.13.1)."""
    found: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield found
    found += [
        str(w.message)
        for w in caught
        if "_dynamo" in w.filename and not str(w.message).startswith(INTERPRETER_NOTE)
    ]


INTERPRETER_NOTE = "Guards may run slower on Python 3.13.0"
