"""The tiny config trained for keyframes and continuation (docs/design.md, "Keyframes").

Moving shapes of which half detour or pause between their ends (`data.path_change_prob`), so a
middle keyframe has something to decide; half the training clips get one or two middle
keyframes, a quarter their first 2 or 3 frames (a long video's next clip), and c_image a mask
channel. Otherwise the quick start's recipe and budget (docs/results.md, "Keyframes").
"""

from configs import tiny


def get_config():
  config = tiny.get_config()
  config.data.path_change_prob = 0.5
  cond = config.conditioning
  cond.keyframe_prob = 0.5
  cond.keyframe_max_count = 2
  cond.leading_frames_prob = 0.25
  cond.max_leading_frames = 3
  cond.keyframe_mask = True
  return config
