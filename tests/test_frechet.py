"""Streaming feature statistics and the Fréchet distance (the arithmetic of FID and FVD)."""

import numpy as np
import pytest
from scipy import linalg

from pixeldance_jax.evaluate import frechet


def _features(seed, n=300, dim=12, shift=0.0):
  rng = np.random.default_rng(seed)
  mixing = rng.normal(size=(dim, dim))
  return (rng.normal(size=(n, dim)) @ mixing + shift).astype(np.float32)


def _reference_distance(mu1, sigma1, mu2, sigma2):
  """The formula as FID's reference implementation (pytorch-fid) computes it, with scipy."""
  covmean = linalg.sqrtm(sigma1.dot(sigma2))
  diff = mu1 - mu2
  return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real)


def test_streamed_batches_give_the_mean_and_covariance_of_all():
  features = _features(0)
  stats = frechet.RunningStats(12)
  for start, stop in ((0, 7), (7, 150), (150, 151), (151, 300)):
    stats.update(features[start:stop])
  mean, covariance = stats.mean_and_covariance()
  data = features.astype(np.float64)
  np.testing.assert_allclose(mean, data.mean(0), rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(covariance, np.cov(data, rowvar=False), rtol=1e-10, atol=1e-10)
  assert stats.count == 300


def test_shares_of_a_stream_merge_and_reduce_to_the_whole():
  features = _features(1)
  whole = frechet.RunningStats(12).update(features)
  shares = [frechet.RunningStats(12).update(features[i::3]) for i in range(3)]
  merged = shares[0].merge(shares[1]).merge(shares[2])
  # `reduce` as process 0 of three calls it: the sum adds the other processes' arrays, which
  # `reduce` asks for in the order count, total, outer.
  others = iter([[np.asarray([s.count], np.float64) for s in shares[1:]],
                 [s.total for s in shares[1:]], [s.outer for s in shares[1:]]])
  sum_over_processes = lambda array: array + sum(next(others))
  reduced = shares[0].reduce(sum_over_processes)
  for stats in (merged, reduced):
    assert stats.count == whole.count
    np.testing.assert_allclose(stats.total, whole.total, rtol=1e-12)
    np.testing.assert_allclose(stats.outer, whole.outer, rtol=1e-12)


def test_frechet_distance_matches_the_reference_formula():
  real = frechet.RunningStats(12).update(_features(2))
  fake = frechet.RunningStats(12).update(_features(3, shift=0.5))
  expected = _reference_distance(*real.mean_and_covariance(), *fake.mean_and_covariance())
  found = frechet.frechet_distance_of(real, fake)
  assert expected > 1.0
  np.testing.assert_allclose(found, expected, rtol=1e-8)


def test_frechet_distance_is_zero_for_equal_and_the_mean_gap_for_shifted_gaussians():
  stats = frechet.RunningStats(12).update(_features(4))
  mean, covariance = stats.mean_and_covariance()
  assert abs(frechet.frechet_distance(mean, covariance, mean, covariance)) < 1e-8
  shift = np.linspace(-1, 1, 12)
  np.testing.assert_allclose(
      frechet.frechet_distance(mean, covariance, mean + shift, covariance), shift @ shift,
      rtol=1e-8)


def test_fewer_samples_than_dimensions_give_a_finite_distance():
  """Singular covariances (as with a few hundred videos of 400 I3D logits): real, >= 0."""
  a = frechet.RunningStats(12).update(_features(5, n=6))
  b = frechet.RunningStats(12).update(_features(6, n=6))
  distance = frechet.frechet_distance_of(a, b)
  assert np.isfinite(distance) and distance >= 0


def test_statistics_round_trip_and_bad_inputs_are_named(tmp_path):
  stats = frechet.RunningStats(12).update(_features(7))
  path = str(tmp_path / "real.npz")
  stats.save(path)
  loaded = frechet.RunningStats.load(path)
  assert loaded.count == stats.count and loaded.dim == 12
  np.testing.assert_array_equal(loaded.outer, stats.outer)
  (tmp_path / "broken.npz").write_bytes(b"not an npz")
  with pytest.raises(ValueError, match="broken.npz is not a statistics file"):
    frechet.RunningStats.load(str(tmp_path / "broken.npz"))
  with pytest.raises(ValueError, match=r"do not fit \[n, 12\]"):
    stats.update(np.zeros((2, 5)))
  with pytest.raises(ValueError, match="NaN or inf"):
    stats.update(np.full((2, 12), np.nan))
  with pytest.raises(ValueError, match="at least 2 samples"):
    frechet.RunningStats(12).update(np.zeros((1, 12))).mean_and_covariance()
  with pytest.raises(ValueError, match="mismatched statistics"):
    frechet.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
