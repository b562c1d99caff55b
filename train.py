"""Train, validate, test and predict with gated mixtures of frozen Ridge experts.

python train.py fit --config configs/quickstart.yaml
python train.py fit --config configs/dual_tower.yaml --model.fusion logit_add --data.noise_level 0.5
python train.py test --config configs/dual_tower.yaml --ckpt_path best
"""

from moe.cli import cli_main

if __name__ == "__main__":
    cli_main()
