"""saelab's Hydra config-source plugin: the ``sweep`` group from directories of sweep files."""
