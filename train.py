"""Train a model: python train.py [model=cnn|mlp|rnn] [experiment=...] [key=value ...]

    python train.py                                    # MNIST CNN, 5 epochs
    python train.py experiment=mnist_cnn               # the recommended MNIST recipe
    python train.py -m optimizer=sgd,adam optimizer.lr=0.1,0.01   # a sweep
    python train.py debug=fdr                          # one batch of everything, in seconds

The config is composed from conf/ (see conf/train.yaml); every run writes its config, TensorBoard events,
checkpoints and metrics.json into its own folder under logs/.
"""

import hydra
from omegaconf import DictConfig

from gradlab.cli import check_overrides, run_entry


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    # Lightning and the models are imported only after the config is known to be valid.
    return run_entry("gradlab.train", cfg)


if __name__ == "__main__":
    check_overrides(__file__, "train")  # a mistyped key or option: one line with a suggestion
    main()
