"""gradlab: train real models with Lightning + Hydra, and see their gradients."""

from gradlab import resolvers as _resolvers

__version__ = "0.1.0"
_resolvers.register()  # ${run_name:...} and ${run_group:...}, used by conf/logger/: before any config resolves
