"""Predict with a checkpoint: python predict.py ckpt_path=<file.ckpt | run folder | last> input=<...> [--json]

    python predict.py ckpt_path=logs/train/runs/<run> input=digit.png      # CNN/MLP: class + probabilities
    python predict.py ckpt_path=logs/train/runs/<run> input=scans/ --json  # a folder of images, as JSON
    python predict.py ckpt_path=logs/train/runs/<rnn run> input=review.txt # RNN: probability of positive

Images of any size and colour become 28x28 grey digits (light on dark, like MNIST). See conf/predict.yaml.
"""

import sys

import hydra
from omegaconf import DictConfig

from gradlab.config.cli import check_overrides, checked


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    with checked(cfg):  # a bad value stops here, before the heavy imports below
        from gradlab.run.predict import run

        run(cfg)


if __name__ == "__main__":
    sys.argv = [("json=true" if arg == "--json" else arg) for arg in sys.argv]  # Hydra takes no such flag
    check_overrides(__file__, "predict")
    main()
