"""``python -m dist_bregman`` and the ``dist-bregman`` command: the CLI (:mod:`.cli`), or,
where its ``cli`` extra is not installed, one line that says what to install, instead of a
traceback from inside an import (or, for scikit-learn, from the config parser)."""

from __future__ import annotations

from importlib.util import find_spec

CLI_IMPORTS = ("lightning", "jsonargparse", "sklearn", "matplotlib")
"""What the ``cli`` extra installs (``pyproject.toml``), by import name."""


def main() -> None:
    missing = [name for name in CLI_IMPORTS if find_spec(name) is None]
    if missing:
        raise SystemExit(
            f"dist-bregman: {', '.join(missing)} not installed; the command and its digits job "
            "come with the cli extra: pip install 'dist_bregman[cli]'"
        )
    from dist_bregman.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
