"""Test a checkpoint: python eval.py ckpt_path=<file.ckpt | run folder | last> [split=val] [data_dir=...]

    python eval.py ckpt_path=logs/train/runs/2024-05-01_12-00-00     # that run's best checkpoint
    python eval.py ckpt_path=last split=val

Writes metrics.json (test/loss, test/acc, ...) into logs/eval/runs/<time>/. See conf/eval.yaml.
"""

import hydra
from omegaconf import DictConfig

from gradlab.config.cli import check_overrides, checked


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    with checked(cfg):  # a bad value stops here, before the heavy imports below
        from gradlab.run.evaluate import run

        run(cfg)


if __name__ == "__main__":
    check_overrides(__file__, "eval")
    main()
