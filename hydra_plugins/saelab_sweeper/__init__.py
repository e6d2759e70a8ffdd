"""saelab's Hydra sweeper plugin (``hydra/sweeper=saelab``): Optuna studies of SAE trials."""
