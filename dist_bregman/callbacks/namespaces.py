"""Lightning under either of its names: ``lightning.pytorch`` and ``pytorch_lightning``.

Lightning 2.x publishes one trainer as two packages: ``lightning`` (imported as
``lightning.pytorch``) and the standalone ``pytorch-lightning`` (``pytorch_lightning``). The
callbacks subclass ``lightning.pytorch``'s ``Callback``, and a ``pytorch_lightning`` Trainer
runs them too: it calls callback hooks by name. What does not carry over is finding the
*other* callbacks by class: ``pytorch_lightning.callbacks.BackboneFinetuning`` is not a
``lightning.pytorch.callbacks.BackboneFinetuning``. Matched on one name only, a
``pytorch_lightning`` finetuning run was refused as out of reach, and its
``EMAWeightAveraging`` handed back a dense model without a word.
"""

from __future__ import annotations

import sys

NAMESPACES = ("lightning.pytorch", "pytorch_lightning")


def callback_classes(name: str) -> tuple[type, ...]:
    """Lightning's callback class ``name`` (``"BackboneFinetuning"``, ...) from each of
    :data:`NAMESPACES` that this process has imported.

    A Trainer's callbacks come from a namespace already imported: no instance of a class
    from the other can exist, and importing it here would only cost its import time.
    """
    found = []
    for namespace in NAMESPACES:
        cls = getattr(sys.modules.get(f"{namespace}.callbacks"), name, None)
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)
