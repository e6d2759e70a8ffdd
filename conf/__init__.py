"""saelab's primary Hydra config, shipped in the wheel as the package ``saelab.conf``
(``saelab/configs.py`` finds it; the ``sweep`` group comes from ``sweeps/``)."""
