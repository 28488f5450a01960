"""gradlab's SLURM launcher for Hydra (hydra/launcher=slurm): see slurm_launcher.py.

The resolver is registered here because Hydra imports every plugin package before it composes a config, and
conf/hydra/launcher/slurm.yaml needs it to resolve.
"""

from omegaconf import OmegaConf


def _ranks_per_node(gpus_per_node) -> int:
    """One rank per GPU, and one on a node without GPUs (sbatch rejects --ntasks-per-node=0)."""
    return max(1, int(gpus_per_node or 0))


OmegaConf.register_new_resolver("gradlab.ranks_per_node", _ranks_per_node, replace=True)
