"""gradlab's Optuna sweeper for Hydra (hydra/sweeper=gradlab_optuna): see optuna_sweeper.py."""
