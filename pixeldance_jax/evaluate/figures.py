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


def line_charts(charts: dict[str, dict[str, Sequence[tuple[float, float]]]], x_label: str = "",
                targets: dict[str, float] | None = None, plot_width: int = 200,
                plot_height: int = 110, per_row: int = 3) -> np.ndarray:
  """Line charts, `per_row` side by side, one per metric: `{metric: {label: [(x, y), ...]}}`,
  each label a line of its own colour through a dot per point, named in a key above the charts.
  `targets`: `{metric: y}` drawn as a grey line across its chart. Each chart has its own y range
  (its lowest and highest values and target, written beside the axis); all share x from 0 to
  the largest x."""
  targets = targets or {}
  labels = list(dict.fromkeys(label for chart in charts.values() for label in chart))
  colours = {label: _LINES[i % len(_LINES)] for i, label in enumerate(labels)}
  points = [p for chart in charts.values() for line in chart.values() for p in line]
  x_high = max([x for x, _ in points] + [1e-9])
  # The widest y label sets the margin ("0" stands in where there are no values).
  y_texts = [f"{y:.3g}" for y in [y for _, y in points] + list(targets.values()) + [0.0]]
  margin = max(_text_width(text) for text in y_texts) + 2 * _GAP
  # Room on the right for half the x axis's end label, which is centred on the axis's end.
  chart_width = margin + plot_width + _text_width(f"{x_high:.3g}") // 2 + 2 * _GAP
  chart_height = _LINE + _GAP + plot_height + 2 * _LINE + _GAP
  rows = math.ceil(len(charts) / per_row)
  image = Image.new("RGB", (max(min(len(charts), per_row) * chart_width, _key_width(labels)),
                            _LINE + _GAP + rows * chart_height), _BACKGROUND)
  draw = ImageDraw.Draw(image)
  _draw_key(draw, colours)
  for index, (metric, lines) in enumerate(charts.items()):
    left = (index % per_row) * chart_width + margin
    top = _LINE + _GAP + (index // per_row) * chart_height
    draw.text((left, top), metric, fill=_INK, font=_font())
    plot = _Plot(left, top + _LINE + _GAP, plot_width, plot_height, x_high,
                 [y for line in lines.values() for _, y in line] +
                 ([targets[metric]] if metric in targets else []))
    plot.draw_axes(draw, x_label)
    if metric in targets:
      y = plot.y(targets[metric])
      draw.line((left, y, left + plot_width, y), fill=_TARGET)
    for label, line in lines.items():
      plot.draw_line(draw, line, colours[label])
  return np.asarray(image)


class _Plot:
  """Where a line chart's values land: x from 0 to `x_high`, y over `ys`' range padded by a
  little, so that a line at either end stays clear of the frame."""

  def __init__(self, left: int, top: int, width: int, height: int, x_high: float,
               ys: Sequence[float]):
    self.left, self.top, self.width, self.height, self.x_high = left, top, width, height, x_high
    self.low, self.high = (min(ys), max(ys)) if ys else (0.0, 1.0)
    pad = 0.06 * (self.high - self.low) if self.high > self.low else 1.0
    self.y_low, self.y_span = self.low - pad, self.high - self.low + 2 * pad

  @property
  def bottom(self) -> int:
    return self.top + self.height

  def x(self, value: float) -> float:
    return self.left + value / self.x_high * self.width

  def y(self, value: float) -> float:
    return self.bottom - (value - self.y_low) / self.y_span * self.height

  def draw_axes(self, draw: ImageDraw.ImageDraw, x_label: str) -> None:
    """The axes, the y range's ends beside the y axis, 0 and `x_high` under the x axis."""
    draw.line((self.left, self.top, self.left, self.bottom, self.left + self.width,
               self.bottom), fill=_INK)
    for value in {self.low, self.high}:
      text = f"{value:.3g}"
      draw.text((self.left - _GAP - _text_width(text), self.y(value) - _LINE // 2), text,
                fill=_INK, font=_font())
    for text, x in (("0", self.left), (f"{self.x_high:.3g}", self.left + self.width)):
      draw.text((x - _text_width(text) // 2, self.bottom + _GAP), text, fill=_INK,
                font=_font())
    if x_label:
      draw.text((self.left + self.width // 2 - _text_width(x_label) // 2,
                 self.bottom + _LINE), x_label, fill=_INK, font=_font())

  def draw_line(self, draw: ImageDraw.ImageDraw, points: Sequence[tuple[float, float]],
                colour: tuple[int, int, int]) -> None:
    xy = [(self.x(x), self.y(y)) for x, y in sorted(points)]
    if len(xy) > 1:
      draw.line(xy, fill=colour, width=2)
    for x, y in xy:
      draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)


_LINES = ((66, 110, 180), (230, 120, 0), (60, 150, 60), (190, 50, 50), (130, 80, 170),
          (100, 100, 100))
_SWATCH = 12
_TARGET = (170, 170, 170)


def _key_width(labels: Sequence[str]) -> int:
  return _GAP + sum(_SWATCH + _GAP + _text_width(label) + 3 * _GAP for label in labels)


def _draw_key(draw: ImageDraw.ImageDraw, colours: dict[str, tuple[int, int, int]]) -> None:
  """A swatch of each label's colour and its name, left to right along the top."""
  x = _GAP
  for label, colour in colours.items():
    draw.rectangle((x, _GAP, x + _SWATCH, _GAP + _SWATCH), fill=colour)
    draw.text((x + _SWATCH + _GAP, _GAP), label, fill=_INK, font=_font())
    x += _SWATCH + _GAP + _text_width(label) + 3 * _GAP
