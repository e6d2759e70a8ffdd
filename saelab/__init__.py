"""saelab: sweeps of TopK sparse autoencoders on language-model activations, in MLX."""

from saelab import accel as _accel

# Before anything imports mlx.core: preload OpenBLAS and tune malloc on Linux.
_accel.setup()

__version__ = "0.1.0"

__all__ = ["InterpretableModel", "SAEConfig", "SAE", "__version__"]


def __getattr__(name):  # lazy: `import saelab` stays cheap (CLI start-up, subprocesses)
    if name == "InterpretableModel":
        from saelab.guide import InterpretableModel

        return InterpretableModel
    if name == "SAEConfig":
        from saelab.config import SAEConfig

        return SAEConfig
    if name == "SAE":
        from saelab.guide import SAE

        return SAE
    raise AttributeError(name)
