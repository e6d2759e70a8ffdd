"""The guide's "Phase 2" snippets, as written, on saelab's offline default model.

Trains a small SAE on layer 10's MLP (or loads one: --sae PATH), then runs feature
analysis, feature visualization, the feature dashboard and steering exactly as
the guide writes them, plus saelab's extras (evaluate, steered generation).

    python examples/sae_phase2.py            # the dashboard answers once, then the script ends
    python examples/sae_phase2.py --serve    # ...or keeps serving it until Ctrl-C
"""

import argparse
import threading
import time
import urllib.request

from saelab import InterpretableModel, SAEConfig  # import saelab before mlx: fast BLAS on Linux
from saelab.config import DataConfig
from saelab.data import load_texts

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--sae", help="a saved SAE of layer 10's MLP (default: train one)")
parser.add_argument("--serve", action="store_true", help="keep the dashboard running")
parser.add_argument("--out", default="outputs/phase2", help="where files are written")
parser.add_argument("--texts", type=int, default=60, help="documents of the default corpus used")
args = parser.parse_args()

model = InterpretableModel("smollm2_135m")  # the guide: "mlx-community/Llama-3.2-1B-Instruct"
texts = [t[:512] for t in load_texts(DataConfig())[:args.texts]]  # the guide's text[:512] samples
if args.sae:
    sae = model.load_sae(args.sae)
else:
    sae = model.train_sae(layer=10, dataset=texts, config=SAEConfig(
        expansion_factor=4, k=32, num_epochs=2, batch_size=256, downstream_sequences=2),
        save_path=f"{args.out}/sae.mlx")

# ---- Feature Analysis (the guide, as written)
top_features = sae.analyze_text(
    model,
    prompt="Artificial intelligence is transforming society",
    top_k=10
)

activating_texts = sae.get_top_activating_texts(
    feature_idx=1234,
    dataset=texts,
    top_k=20
)

for token, feats in top_features:
    print(f"{token!r:>16}: " + ", ".join(f"{f} ({a:.2f})" for f, a in feats[:4]))
strongest = top_features[-1].features[0][0]  # the last token's strongest feature
print(f"feature 1234 fires most on: {[t.text[-60:] for t in activating_texts[:3]]}")
for t in sae.get_top_activating_texts(feature_idx=strongest, dataset=texts, top_k=3):
    print(f"feature {strongest} at {t.activation:.2f}: {t.text!r}")

# ---- Feature Visualization (the guide, as written)
sae.visualize_feature(
    feature_idx=1234,
    model=model,
    dataset=texts
)

fig = sae.visualize_feature(feature_idx=strongest, model=model, dataset=texts,
                            html_path=f"{args.out}/feature_{strongest}.html")
print(f"{fig.layout.title.text}; written to {args.out}/feature_{strongest}.html")

if args.serve:
    sae.launch_dashboard(model=model, dataset=texts)  # blocks until Ctrl-C
else:  # the same call in a background thread, asked once for its index page
    threading.Thread(target=lambda: sae.launch_dashboard(model=model, dataset=texts),
                     daemon=True).start()
    for _ in range(600):
        try:
            with urllib.request.urlopen("http://127.0.0.1:8050/", timeout=5) as page:
                print(f"dashboard on http://127.0.0.1:8050/: HTTP {page.status}, "
                      f"{len(page.read())} bytes")
            break
        except OSError:
            time.sleep(0.5)
    else:
        raise SystemExit("the dashboard did not answer on http://127.0.0.1:8050/")

# ---- Model Steering (the guide, as written)
with model.trace("Generate text about...") as trace:
    sae.steer(
        model=model,
        layer=10,
        feature_idx=1234,
        strength=2.0  # Amplify this feature
    )
    output = model.output.save()

print(f"steered logits: {output.shape}; next token: "
      f"{model.tokenizer.decode([int(output[0, -1].argmax())])!r}")
print("steered generation:", repr(model.generate("The weather today", max_tokens=12,
                                                 steer=[(sae, strongest, 8.0)])))
print({k: round(v, 4) for k, v in sae.evaluate(model, texts[:10], sequences=2).items()})
