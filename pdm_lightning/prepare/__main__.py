"""``python -m pdm_lightning.prepare --config CONFIG [train.py fit options]``: prepare a run's inputs, train nothing.

Checks the photos and the base model, computes the subject masks, generates the class images and
builds the PDM teacher bank exactly as ``train.py fit`` with the same options would before its first
step; a later ``fit`` then finds them done. Useful to build the bank on one machine for several runs,
or to see input errors without waiting for a GPU.
"""

from __future__ import annotations

import sys

from pdm_lightning.core import console
from pdm_lightning.cli import cli_main, report_input_errors, with_commented_print_config

PROG = "python -m pdm_lightning.prepare"


def main(args: list[str] | None = None) -> None:
    """The command; ``args`` replaces the command line (tests). ``--verbose`` as for train.py."""
    if args is None:
        # The transformers notices printed while this package imported diffusers cannot be taken back;
        # the rest (Lightning's, our warnings' format) is quieted from here.
        console.install(sys.argv)
        # LightningCLI reads sys.argv itself: given both, it warns that args and the command line differ.
        sys.argv[1:] = with_commented_print_config(sys.argv[1:])
    else:
        args = list(args)
        console.take_verbose_flag(args)
    with report_input_errors():
        cli = cli_main(args, run=False, prog=PROG, description=__doc__.split("\n\n", 1)[0].replace("``", "`"))
        # What fit does before its first step: checks and masks, then the class images and the bank
        # (one process here; `train.py fit --trainer.devices N` splits them across N ranks).
        cli.datamodule.prepare_data()
        cli.datamodule.setup("fit")


if __name__ == "__main__":
    main()
