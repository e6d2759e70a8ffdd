"""The guide's W&B example. Runs are written offline under outputs/wandb/
(WANDB_MODE=online to stream); upload later with `wandb sync outputs/wandb/offline-run-*`.

    python examples/sae_with_wandb.py
"""

from saelab import InterpretableModel, SAEConfig
from saelab.config import DataConfig
from saelab.data import load_texts

layer, component, k, expansion = 10, "mlp", 32, 8
config = SAEConfig(
    expansion_factor=expansion,
    k=k,
    learning_rate=1e-3,
    num_epochs=2,
    use_wandb=True,
    wandb_project="my-sae-experiments",
    wandb_name=f"sae_l{layer}_{component}_k{k}_exp{expansion}",
    wandb_tags=["sae", f"layer{layer}", component],
)
model = InterpretableModel("smollm2_135m")
texts = load_texts(DataConfig())[:300]
sae = model.train_sae(layer=layer, dataset=texts, component=component, config=config)
print(sae.metadata["metrics"])
