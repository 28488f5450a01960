"""gradlab: train real models with Lightning + Hydra, and see their gradients."""

from gradlab.config import resolvers as _resolvers

__version__ = "0.1.0"

# Before Hydra composes any config: conf/hydra/default.yaml names each run's folder with ${gradlab.claim_dir:...},
# conf/logger/ names tracker runs with ${run_name:...} and ${run_group:...}.
_resolvers.register()
