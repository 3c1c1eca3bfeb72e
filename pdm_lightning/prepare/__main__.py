"""``python -m pdm_lightning.prepare --config CONFIG [train.py fit options]``: prepare a run's inputs, train nothing.

Checks the photos and the base model, computes the subject masks, generates the class images and
builds the PDM teacher bank exactly as ``train.py fit`` with the same options would before its first
step; a later ``fit`` then finds them done. Useful to build the bank on one machine for several runs,
or to see input errors without waiting for a GPU.
"""

from __future__ import annotations

import sys

from pdm_lightning.cli import cli_main, report_input_errors


def main(args: list[str] | None = None) -> None:
    with report_input_errors():
        cli = cli_main(list(sys.argv[1:] if args is None else args), run=False)
        cli.datamodule.prepare_data()


if __name__ == "__main__":
    main()
