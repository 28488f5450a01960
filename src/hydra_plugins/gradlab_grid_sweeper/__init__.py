"""gradlab's grid sweeper for Hydra (hydra/sweeper=gradlab_grid, the default): see grid_sweeper.py."""
