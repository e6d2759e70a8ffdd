"""The guide's realistic training: a larger text set, the guide's configuration fields.

With a reachable Hugging Face hub, ``--hub wikitext`` loads wikitext-103 exactly as
the guide does; offline (the default) it uses saelab's pydocs corpus.

    python examples/sae_realistic_training.py [--hub wikitext] [--texts 5000]
"""

import argparse

from saelab import InterpretableModel, SAEConfig
from saelab.config import DataConfig
from saelab.data import load_texts

ap = argparse.ArgumentParser()
ap.add_argument("--hub", default=None, help="e.g. wikitext (needs the hub)")
ap.add_argument("--texts", type=int, default=5000)
args = ap.parse_args()

if args.hub:
    from datasets import load_dataset

    dataset = load_dataset(args.hub, "wikitext-103-raw-v1", split="train")
    texts = []
    for item in dataset:
        text = item["text"].strip()
        if len(text) > 50:
            texts.append(text[:512])
        if len(texts) >= args.texts:
            break
else:
    texts = load_texts(DataConfig())[: args.texts]

model = InterpretableModel("smollm2_135m")
config = SAEConfig(
    expansion_factor=16,
    k=32,
    learning_rate=1e-3,
    num_epochs=3,
    batch_size=1024,
    validation_split=0.05,
    normalize_input=True,
    tied_weights=False,
    gradient_clip=1.0,
)
sae = model.train_sae(layer=10, dataset=texts, config=config, save_path="outputs/sae_realistic.mlx")
m = sae.metadata["metrics"]
print(f"val normalized MSE {m['val/nmse']:.4f} (lowest-norm 99%: {m['val/nmse_p99']:.4f}), "
      f"dead {100 * m['val/dead_fraction']:.2f}%, L0 {m['val/l0']:.0f}")
