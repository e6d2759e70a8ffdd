"""saelab's ready-made sweep files, shipped in the wheel as the package ``saelab.sweeps``
(the options of the Hydra group ``sweep``; see ``saelab/configs.py``)."""
