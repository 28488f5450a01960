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

from gradlab.config.cli import check_overrides, checked


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    with checked(cfg):  # a bad value stops here, before the heavy imports below
        from gradlab.run.train import run

        return run(cfg)


if __name__ == "__main__":
    check_overrides(__file__, "train")  # a mistyped key or option: one line with a suggestion
    main()
