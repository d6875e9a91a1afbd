"""Streaming feature statistics and the Fréchet distance between two Gaussians (FID, FVD).

FID and FVD fit a Gaussian to the features of real and of generated samples (Inception-v3 pool
features per frame, I3D logits per clip) and report

    ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)).

`RunningStats` keeps a count, a sum and a sum of outer products in float64 on the host, so that
any number of videos streams through in batches without being held, statistics of several
processes (or of a cached real-data pass) merge exactly, and the covariance is computed once at
the end.
"""

import dataclasses
from typing import Callable

import numpy as np

from pixeldance_jax.io import video_files


@dataclasses.dataclass
class RunningStats:
  """Sufficient statistics of a stream of `dim`-dimensional features."""
  dim: int
  count: int = 0
  total: np.ndarray | None = None  # [dim] sum of the features.
  outer: np.ndarray | None = None  # [dim, dim] sum of their outer products.

  def __post_init__(self):
    if self.total is None:
      self.total = np.zeros(self.dim, np.float64)
    if self.outer is None:
      self.outer = np.zeros((self.dim, self.dim), np.float64)

  def update(self, features: np.ndarray) -> "RunningStats":
    """Adds a batch `[n, dim]` (any float dtype; accumulated in float64)."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[1] != self.dim:
      raise ValueError(f"features of shape {features.shape} do not fit [n, {self.dim}]")
    if not np.isfinite(features).all():
      raise ValueError("features hold NaN or inf: the feature network's input is broken")
    self.count += features.shape[0]
    self.total += features.sum(axis=0)
    self.outer += features.T @ features
    return self

  def merge(self, other: "RunningStats") -> "RunningStats":
    """These statistics and `other`'s, as if one stream (e.g. another process's share)."""
    if other.dim != self.dim:
      raise ValueError(f"cannot merge statistics of dimension {other.dim} into {self.dim}")
    return RunningStats(self.dim, self.count + other.count, self.total + other.total,
                        self.outer + other.outer)

  def reduce(self, sum_over_processes: Callable[[np.ndarray], np.ndarray]) -> "RunningStats":
    """The statistics of every process's stream, given a function that sums an array over the
    processes (e.g. `multihost_utils.process_allgather(x).sum(0)`); float64 is kept."""
    count = int(round(float(sum_over_processes(np.asarray([self.count], np.float64))[0])))
    return RunningStats(self.dim, count, sum_over_processes(self.total),
                        sum_over_processes(self.outer))

  def mean_and_covariance(self) -> tuple[np.ndarray, np.ndarray]:
    """(mean [dim], unbiased covariance [dim, dim]), as numpy.cov computes them."""
    if self.count < 2:
      raise ValueError(f"a covariance needs at least 2 samples; got {self.count}")
    mean = self.total / self.count
    covariance = (self.outer - self.count * np.outer(mean, mean)) / (self.count - 1)
    return mean, (covariance + covariance.T) / 2

  def save(self, path: str) -> None:
    """Writes the statistics (an .npz) atomically: a cache is never left half written."""
    with video_files.atomic_path(path) as partial:  # Ends in .npz: savez keeps the name.
      np.savez(partial, dim=self.dim, count=self.count, total=self.total, outer=self.outer)

  @classmethod
  def load(cls, path: str) -> "RunningStats":
    try:
      with np.load(path) as data:
        return cls(int(data["dim"]), int(data["count"]), data["total"], data["outer"])
    except (OSError, KeyError, ValueError) as error:
      raise ValueError(f"{path} is not a statistics file written by RunningStats.save: "
                       f"{error}") from error


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
  """Square root of a symmetric positive semi-definite matrix (round-off negatives clipped)."""
  values, vectors = np.linalg.eigh(matrix)
  return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mean1: np.ndarray, cov1: np.ndarray, mean2: np.ndarray,
                     cov2: np.ndarray) -> float:
  """Fréchet distance between N(mean1, cov1) and N(mean2, cov2).

  Tr((S_1 S_2)^(1/2)) is computed as Tr((S_1^(1/2) S_2 S_1^(1/2))^(1/2)), a symmetric PSD
  matrix with the same eigenvalues as S_1 S_2: real, and stable where S_1 S_2 is singular
  (fewer samples than dimensions), unlike a general matrix square root.
  """
  mean1, mean2 = np.asarray(mean1, np.float64), np.asarray(mean2, np.float64)
  cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
  if mean1.shape != mean2.shape or cov1.shape != cov2.shape or cov1.shape != 2 * mean1.shape:
    raise ValueError(f"mismatched statistics: means {mean1.shape}, {mean2.shape}; "
                     f"covariances {cov1.shape}, {cov2.shape}")
  root1 = _sqrt_psd(cov1)
  middle = root1 @ cov2 @ root1
  trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
  difference = mean1 - mean2
  return float(difference @ difference + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_sqrt)


def frechet_distance_of(stats1: RunningStats, stats2: RunningStats) -> float:
  return frechet_distance(*stats1.mean_and_covariance(), *stats2.mean_and_covariance())
