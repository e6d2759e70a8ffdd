"""The guide's quick start on saelab's offline default model (SmolLM2-135M).

    python examples/sae_quickstart.py
"""

from saelab import InterpretableModel, SAEConfig  # import saelab before mlx: fast BLAS on Linux
import mlx.core as mx
from saelab.config import DataConfig
from saelab.data import load_texts

model = InterpretableModel("smollm2_135m")  # or "mlx-community/Llama-3.2-1B-Instruct" with a hub
texts = load_texts(DataConfig())[:200]  # Python's own documentation, available offline

sae = model.train_sae(
    layer=10,
    dataset=texts,
    config=SAEConfig(expansion_factor=8, k=32, num_epochs=2),
    save_path="outputs/my_sae.mlx",
)

sae = model.load_sae("outputs/my_sae.mlx")
if sae.is_compatible(model, layer=10, component="mlp"):
    print("✓ SAE is compatible!")

with model.trace("The capital of France is") as trace:
    pass
activation = trace.activations["model.layers.10.mlp"]
features = sae.encode(activation)
reconstructed = sae.decode(features)
num_active = int(mx.sum(features[0, -1] != 0))
print(f"Active features (last token): {num_active}/{sae.d_hidden}")
print(f"Reconstruction MSE: {float(mx.mean((activation - reconstructed) ** 2)):.6f}")
print(sae.metadata["metrics"])
