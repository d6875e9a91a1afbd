"""The tiny recipe trained longer and evaluated on more clips: the paper's ablation in miniature
with differences that stand out of the evaluation's noise.

  python -m pixeldance_jax.evaluate.ablation --config=configs/tiny_ablation.py --workdir=DIR

configs/tiny.py (the quick start, 1500 steps, compared on 64 held-out clips) leaves the
variants' FVDs within the real-vs-real floor of each other. Here every variant trains for
2000 steps with the same recipe (the learning-rate schedule stretches to the new length; the
last-frame warmup stays 1000 steps) and is compared on 128 held-out clips, which halves the
floor. On the README's 2-core CPU, one variant per core with two side by side, each trains in
24 to 30 minutes; evaluating the full model (two modes, each again with the empty prompt) takes
15 minutes on one core, each other variant 6 to 8.
"""

from configs import tiny


def get_config():
  config = tiny.get_config()
  config.num_train_steps = 2000
  config.eval.num_videos = 128  # The ablation's default --num_videos.
  return config
