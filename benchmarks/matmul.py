"""Float32 2048x2048 matmul: MLX (with saelab's fast path) vs numpy, one JSON line.

Goal: MLX at least 0.8x numpy's rate. Run with SAELAB_FAST=0 to see plain MLX.
"""

import json

from saelab.doctor import measure

if __name__ == "__main__":
    print(json.dumps({"benchmark": "matmul", **measure(n=2048, repeats=5)}))
