"""gradlab: train real models with Lightning + Hydra, and see their gradients."""

__version__ = "0.1.0"

# Before Hydra composes any config: conf/hydra/default.yaml names each run's folder with ${gradlab.claim_dir:...}.
from gradlab.runs import register_resolver  # noqa: E402

register_resolver()
