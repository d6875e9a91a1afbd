"""Figures of evaluation results, drawn with Pillow: labelled rows of frames and bar charts."""

import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_BACKGROUND = (255, 255, 255)
_INK = (20, 20, 20)
_BAR = (66, 110, 180)
_MARK = (230, 120, 0)  # Outline of a frame that was given to the model.
_GAP = 4
_LINE = 16  # Pixels per line of text.


def _font() -> ImageFont.ImageFont:
  return ImageFont.load_default(size=12)


def _text_width(text: str) -> int:
  return int(math.ceil(_font().getlength(text)))


def frame_rows(rows: Sequence[tuple[str, np.ndarray]], upscale: int = 2,
               title: str = "", marked: Sequence[Sequence[int]] | None = None) -> np.ndarray:
  """One row per (label, uint8 `[F, H, W, 3]`): the label, then the frames left to right.
  `marked`: per row, the frames to outline (those given to the model).

  Returns:
    uint8 `[height, width, 3]`.
  """
  if not rows:
    raise ValueError("frame_rows needs at least one row")
  label_width = max(_text_width(label) for label, _ in rows) + 2 * _GAP
  frames = [np.repeat(np.repeat(np.asarray(f, np.uint8), upscale, 1), upscale, 2)
            for _, f in rows]
  tile_h = max(f.shape[1] for f in frames)
  width = label_width + max(f.shape[0] * (f.shape[2] + _GAP) for f in frames)
  top = _LINE + _GAP if title else 0
  image = Image.new("RGB", (max(width, _text_width(title) + 2 * _GAP),
                            top + len(rows) * (tile_h + _GAP) + _GAP), _BACKGROUND)
  draw = ImageDraw.Draw(image)
  if title:
    draw.text((_GAP, _GAP), title, fill=_INK, font=_font())
  for row, ((label, _), video) in enumerate(zip(rows, frames)):
    y = top + _GAP + row * (tile_h + _GAP)
    draw.text((_GAP, y + tile_h // 2 - _LINE // 2), label, fill=_INK, font=_font())
    for column, frame in enumerate(video):
      x = label_width + column * (frame.shape[1] + _GAP)
      image.paste(Image.fromarray(frame), (x, y))
      if marked is not None and column in marked[row]:
        draw.rectangle((x - 2, y - 2, x + frame.shape[1] + 1, y + frame.shape[0] + 1),
                       outline=_MARK, width=2)
  return np.asarray(image)


def bar_charts(charts: dict[str, dict[str, float | None]], bar_width: int = 28,
               plot_height: int = 110, per_row: int = 3) -> np.ndarray:
  """Bar charts, `per_row` side by side, one per metric: `{metric: {label: value}}` (None or
  NaN: no bar). Each chart has its own scale from 0 (or its most negative value); the value is
  written above its bar and the label under it."""
  labels = list(dict.fromkeys(label for chart in charts.values() for label in chart))
  column = max([_text_width(label) for label in labels] + [bar_width]) + _GAP
  chart_width = max(len(labels) * column + _GAP,
                    max(_text_width(metric) for metric in charts) + 2 * _GAP)
  chart_height = _LINE * 2 + plot_height + _LINE + 3 * _GAP
  rows = math.ceil(len(charts) / per_row)
  image = Image.new("RGB", (min(len(charts), per_row) * (chart_width + 2 * _GAP),
                            rows * chart_height), _BACKGROUND)
  draw = ImageDraw.Draw(image)
  for index, (metric, values) in enumerate(charts.items()):
    left = (index % per_row) * (chart_width + 2 * _GAP) + _GAP
    top = (index // per_row) * chart_height
    draw.text((left, top + _GAP), metric, fill=_INK, font=_font())
    present = [v for v in values.values() if v is not None and math.isfinite(v)]
    low, high = min(present + [0.0]), max(present + [0.0])
    scale = plot_height / (high - low) if high > low else 0.0
    zero = top + _LINE * 2 + _GAP + high * scale
    draw.line((left, zero, left + chart_width - _GAP, zero), fill=_INK)
    for i, label in enumerate(labels):
      x = left + i * column + (column - bar_width) // 2
      value = values.get(label)
      if value is not None and math.isfinite(value):
        y = zero - value * scale
        draw.rectangle((x, min(y, zero), x + bar_width, max(y, zero)), fill=_BAR)
        text = f"{value:.3g}"
        draw.text((x + bar_width // 2 - _text_width(text) // 2, min(y, zero) - _LINE),
                  text, fill=_INK, font=_font())
      name_x = left + i * column + column // 2 - _text_width(label) // 2
      draw.text((name_x, top + chart_height - _LINE - 2 * _GAP), label, fill=_INK,
                font=_font())
  return np.asarray(image)


def stack(images: Sequence[np.ndarray]) -> np.ndarray:
  """Images one above the other on a white background, left-aligned."""
  width = max(image.shape[1] for image in images)
  padded = [np.pad(image, ((0, _GAP), (0, width - image.shape[1]), (0, 0)),
                   constant_values=255) for image in images]
  return np.concatenate(padded, axis=0)
