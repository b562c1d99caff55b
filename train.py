"""``python train.py ...`` = ``moe ...``: train, validate, test and predict with gated mixtures of frozen Ridge experts.

python train.py fit --config quickstart
python train.py fit --config dual_tower --model.fusion logit_add --data.noise_level 0.5
python train.py test --config dual_tower --ckpt_path best
"""

import sys

from moe.main import main

if __name__ == "__main__":
    sys.exit(main())
