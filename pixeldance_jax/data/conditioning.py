"""PixelDance's image and text conditions (docs/design.md, "Training conditions").

These run on device inside the jitted train step: they need the VAE latents (computed there,
or sampled there from cached moments), and drawing them from `fold_in(rng, step)` makes them
part of the exactly reproducible step. Against the paper: the last frame is drawn uniformly from
the clip's last 3 frames; "noise corresponding to 100 timesteps" is the forward process
q(z_100 | z_0) applied to both condition latents (`noise_condition`, one key per example, shared
with sampling); the last frame is zeroed with probability eta (0.25); the text becomes the empty
prompt with probability text_drop_prob (the paper gives no value; 0.1). On the host
(`pipeline.SampleClip`) only the clip window is picked.

c_image = [first, 0, ..., 0, last] along frames, concatenated with z_t on channels.

Keyframes (off in the paper's configs; docs/design.md, "Keyframes"): `Keyframes` can also place
a clip's own frames at random middle positions, or its first few frames (to continue a clip),
into the same c_image, with the same condition noise; and a mask channel, 1 where a frame is
given, so the model can tell "no frame here" from a frame.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from pixeldance_jax.diffusion import schedules

Array = jax.Array


def image_condition(first: Array, last: Array, frames: int) -> Array:
  """`[b, h, w, c]` x 2 -> c_image `[b, frames, h, w, c]`: first, zeros, last.

  Written into a zero video rather than concatenated: XLA fuses the frames' noise draws (their
  random-bit hash) into whatever builds c_image, and a concatenation's fusion evaluates them
  for every frame of the video, the zero ones too (docs/benchmarks.md).
  """
  video = jnp.zeros((first.shape[0], frames) + first.shape[1:], first.dtype)
  return video.at[:, 0].set(first).at[:, -1].set(last)


@dataclasses.dataclass(frozen=True)
class Keyframes:
  """config.conditioning's keyframe fields. At their defaults training draws exactly what the
  paper's conditioning does (the same keys, the same c_image)."""
  prob: float = 0.0  # An example gets 1..max_count middle keyframes with this probability,
  max_count: int = 1  # at distinct random positions 1..F-2.
  leading_prob: float = 0.0  # An example gets its frames 1..k-1 too (k in 2..max_leading),
  max_leading: int = 2  # as a continuation of the clip before it is conditioned.
  mask: bool = False  # c_image gains a channel, 1 where a frame is given.

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "Keyframes":
    """Raises for a config without the fields (a program's partial copy must carry them, and
    a checkpoint's older config gets them from `io.checkpoints.ADDED_KEYS`)."""
    cond = config.conditioning
    found = cls(prob=cond.keyframe_prob, max_count=cond.keyframe_max_count,
                leading_prob=cond.leading_frames_prob, max_leading=cond.max_leading_frames,
                mask=cond.keyframe_mask)
    for key, value in (("keyframe_prob", found.prob), ("leading_frames_prob", found.leading_prob)):
      if not 0.0 <= value <= 1.0:
        raise ValueError(f"config.conditioning.{key}={value!r} is a probability: give a value "
                         "in [0, 1]")
    frames = config.data.frames
    if found.prob and not 1 <= found.max_count <= frames - 2:
      raise ValueError(f"config.conditioning.keyframe_max_count={found.max_count!r}: a clip of "
                       f"{frames} frames has 1 to {frames - 2} middle positions")
    if found.leading_prob and not 2 <= found.max_leading <= frames - 1:
      raise ValueError(f"config.conditioning.max_leading_frames={found.max_leading!r}: give 2 "
                       f"to {frames - 1} for clips of {frames} frames")
    return found

  @property
  def drawn(self) -> bool:
    """Whether training draws frames beyond the first and last."""
    return self.prob > 0.0 or self.leading_prob > 0.0


def mask_channels(config: ml_collections.ConfigDict) -> int:
  return 1 if config.conditioning.keyframe_mask else 0


def with_mask(image_condition: Array, given: Array) -> Array:
  """c_image `[b, f, h, w, c]` ++ the mask channel: 1 where `given` `[b, f]` (bool)."""
  mask = jnp.broadcast_to(given[:, :, None, None, None].astype(image_condition.dtype),
                          image_condition.shape[:-1] + (1,))
  return jnp.concatenate([image_condition, mask], axis=-1)


def keyframe_condition(latents: Array, given: Array) -> Array:
  """`[b, f, h, w, c]` frame latents -> c_image holding those `given` `[b, f]`, zeros elsewhere."""
  return jnp.where(given[:, :, None, None, None], latents, jnp.zeros_like(latents))


def draw_keyframes(rng: Array, batch: int, frames: int, keyframes: Keyframes) -> Array:
  """`[b, f]` bool: the middle keyframes and leading frames an example gets (never frame 0 or
  F-1, which the first and last frame hold)."""
  count_rng, place_rng, use_rng, lead_rng, lead_use_rng = jax.random.split(rng, 5)
  middle = frames - 2
  count = jax.random.randint(count_rng, (batch,), 1, keyframes.max_count + 1)
  count = jnp.where(_bernoulli(use_rng, keyframes.prob, batch), count, 0)
  # A random order of the middle positions per example: the first `count` are given.
  order = jax.vmap(lambda key: jax.random.permutation(key, middle))(
      jax.random.split(place_rng, batch))
  rank = jnp.argsort(order, axis=1)
  given_middle = rank < count[:, None]
  leading = jax.random.randint(lead_rng, (batch,), 2, keyframes.max_leading + 1)
  leading = jnp.where(_bernoulli(lead_use_rng, keyframes.leading_prob, batch), leading, 1)
  given_middle |= jnp.arange(1, frames - 1)[None, :] < leading[:, None]
  no = jnp.zeros((batch, 1), bool)
  return jnp.concatenate([no, given_middle, no], axis=1)


def _bernoulli(rng: Array, prob: float | Array, batch: int) -> Array:
  return jax.random.bernoulli(rng, prob, (batch,))


# The conditioning's numbers, which the train step takes as traced scalars (like the optimiser's):
# the ablation's variants (no text, no last frame, T2V) then share one compiled program.
RATES = ("text_drop_prob", "last_frame_drop_prob", "first_frame_weight",
         "last_frame_warmup_steps")


def rates(config: ml_collections.ConfigDict) -> dict[str, float]:
  """The `use_*` switches and dropout probabilities of `config.conditioning` as numbers:
  a condition turned off is one dropped with probability 1 (the first frame: weight 0)."""
  cond = config.conditioning
  for key in ("text_drop_prob", "last_frame_drop_prob"):
    if not 0.0 <= cond[key] <= 1.0:
      raise ValueError(f"config.conditioning.{key}={cond[key]!r} is a probability: give a "
                       "value in [0, 1]")
  if cond.last_frame_warmup_steps < 0:
    raise ValueError(f"config.conditioning.last_frame_warmup_steps="
                     f"{cond.last_frame_warmup_steps!r} must be >= 0")
  return {"text_drop_prob": float(cond.text_drop_prob) if cond.use_text else 1.0,
          "last_frame_drop_prob": (float(cond.last_frame_drop_prob) if cond.use_last_frame
                                   else 1.0),
          "first_frame_weight": 1.0 if cond.use_first_frame else 0.0,
          "last_frame_warmup_steps": float(cond.last_frame_warmup_steps)}


def rates_at_step(condition_rates: dict[str, Array], step: Array) -> dict[str, Array]:
  """The rates in force at optimiser step `step`: during the first `last_frame_warmup_steps`
  every last frame is dropped (the text alone must then carry the motion)."""
  warming = step < condition_rates["last_frame_warmup_steps"]
  return dict(condition_rates, last_frame_drop_prob=jnp.where(
      warming, 1.0, condition_rates["last_frame_drop_prob"]))


def _where_batch(mask: Array, a: Array, b: Array) -> Array:
  return jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)), a, b)


def noise_condition(rngs: Array, frame_latent: Array, alpha_bar: Array, timestep: int) -> Array:
  """Forward-process noise q(z_timestep | z_0) on condition latents `[b, h, w, c]`.

  rngs: one key per example, `[b]`, so an example's noise does not depend on its batch (a
  sampled clip is the same alone or in a batch). timestep 0 returns the latents unchanged.
  Training and sampling both noise their conditions here.
  """
  if timestep <= 0:
    return frame_latent
  noise = jax.vmap(lambda rng: jax.random.normal(rng, frame_latent.shape[1:],
                                                 frame_latent.dtype))(rngs)
  steps = jnp.full((frame_latent.shape[0],), timestep, jnp.int32)
  return schedules.add_noise(alpha_bar, frame_latent, noise, steps)


def training_conditions(rng: Array, latents: Array, text: Array, null_text: Array,
                        alpha_bar: Array, config: ml_collections.ConfigDict,
                        condition_rates: dict[str, float | Array] | None = None
                        ) -> tuple[Array, Array]:
  """Draws (c_image `[b, f, h, w, c]`, text) for one training batch.

  latents: the clip `[b, f, h, w, c]`. text: token ids `[b, length]` with `null_text` the empty
  prompt's `[length]`, or (latent cache) embeddings `[b, length, hidden]` with the empty
  prompt's `[length, hidden]`. The last frame is drawn uniformly from the clip's last
  `cond.last_frame_candidates` frames; first and last get `cond.noise_timestep` noise; the last
  frame is dropped (zeros) with probability eta; the text is replaced by the empty prompt with
  probability `cond.text_drop_prob`. The `use_*` switches turn a condition off entirely.
  `condition_rates`: `rates(config)`, possibly traced; by default the config's own.

  A single frame (the image batches of joint training) has no other frame to condition on:
  its c_image is zeros, so image steps train text-to-image, with text dropout as for videos.
  With `Keyframes` (config.conditioning's keyframe fields) some middle or leading frames are
  given too, and the mask channel marks every given frame.
  """
  cond = config.conditioning
  condition_rates = rates(config) if condition_rates is None else condition_rates
  batch, frames = latents.shape[:2]
  last_rng, first_noise_rng, last_noise_rng, drop_rng, text_rng = jax.random.split(rng, 5)
  keep_text = ~_bernoulli(text_rng, condition_rates["text_drop_prob"], batch)
  text = _where_batch(keep_text, text, jnp.broadcast_to(null_text, text.shape))
  if frames == 1:
    condition = jnp.zeros_like(latents)
    if mask_channels(config):
      condition = with_mask(condition, jnp.zeros((batch, 1), bool))
    return condition, text
  candidates = min(cond.last_frame_candidates, frames - 1)
  last_index = frames - 1 - jax.random.randint(last_rng, (batch,), 0, candidates)
  last = jnp.take_along_axis(latents, last_index[:, None, None, None, None], axis=1)[:, 0]
  # One key per example, as sampling draws them (the step's rng stays the only source).
  first = noise_condition(jax.random.split(first_noise_rng, batch), latents[:, 0], alpha_bar,
                          cond.noise_timestep)
  last = noise_condition(jax.random.split(last_noise_rng, batch), last, alpha_bar,
                         cond.noise_timestep)

  keep_last = ~_bernoulli(drop_rng, condition_rates["last_frame_drop_prob"], batch)
  last = _where_batch(keep_last, last, jnp.zeros_like(last))
  first_weight = jnp.asarray(condition_rates["first_frame_weight"], first.dtype)
  first = first * first_weight
  condition = image_condition(first, last, frames)
  keyframes = Keyframes.from_config(config)
  if not (keyframes.drawn or keyframes.mask):
    return condition, text
  given = jnp.zeros((batch, frames), bool)
  if keyframes.drawn:
    # Their own stream (folded, not split): the paper's draws above stay as they are.
    place_rng, noise_rng = jax.random.split(jax.random.fold_in(rng, 1))
    given = draw_keyframes(place_rng, batch, frames, keyframes)
    flat = latents.reshape((batch * frames,) + latents.shape[2:])
    noised = noise_condition(jax.random.split(noise_rng, batch * frames), flat, alpha_bar,
                             cond.noise_timestep).reshape(latents.shape)
    condition = jnp.where(given[:, :, None, None, None], noised, condition)
  if keyframes.mask:
    given = given.at[:, 0].set(first_weight > 0).at[:, -1].set(keep_last)
    condition = with_mask(condition, given)
  return condition, text
