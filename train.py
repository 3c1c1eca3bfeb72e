"""Train, resume or evaluate a PDMBooth / DreamBooth run.

    python train.py fit --config configs/quickstart.yaml
    python train.py fit --config configs/quickstart.yaml --ckpt_path last   # resume
    python train.py fit --print_config                                      # every option
"""

from pdm_lightning.cli import main

if __name__ == "__main__":
    main()
