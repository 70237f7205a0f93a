"""Tokens per second of mlx_smolvlm next to transformers and mlx-vlm (see `mlx_smolvlm.bench`).

python -m benchmarks.tokens_per_second --shape 256m --precision fp32,4bit --out DIR
"""

import sys

from mlx_smolvlm.bench import main

if __name__ == "__main__":
    sys.exit(main())
