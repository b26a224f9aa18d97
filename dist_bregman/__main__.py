"""``python -m dist_bregman`` is the ``dist-bregman`` command."""

from dist_bregman.cli import main

main()
