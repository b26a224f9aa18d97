"""What Dynamo warns about while tracing: the library's calls must give it nothing."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def dynamo_warnings() -> Iterator[list[str]]:
    """The messages of the warnings Dynamo raised in the block (code it could not trace),
    in the list yielded, filled when the block ends."""
    found: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield found
    found += [str(w.message) for w in caught if "_dynamo" in w.filename]
