"""Train, resume or evaluate a PDMBooth / DreamBooth run.

    python train.py fit --config configs/quickstart.yaml
    python train.py fit --config configs/quickstart.yaml --ckpt_path last   # resume
    python train.py fit --help                                              # our options (--help-all: every one)
    python train.py fit --print_config                                      # the whole config
    python train.py fit ... --verbose                                       # the libraries' notices too
"""

import sys

from pdm_lightning.core import console

if __name__ == "__main__":
    # Before the imports below: transformers prints its notices while diffusers imports.
    console.install(sys.argv)

from pdm_lightning.cli import main

if __name__ == "__main__":
    main()
