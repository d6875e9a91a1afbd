"""The torch reference of the speed benchmarks: diffusers' UNet3DConditionModel at our size."""

import ml_collections


def torch_unet3d(config: ml_collections.ConfigDict):
  """diffusers' UNet3DConditionModel laid out as our U-Net (random weights, dropout off).

  diffusers' `attention_head_dim` is the number of heads (diffusers issue 2011), so it gets
  channels / head width, one number for all levels (its transformer_in takes it too). Left
  different: its transformer_in has 8 heads of that many features (ours: transformer_in_heads
  of attention_head_dim), and it has no pooled-text path; both are small beside the rest.
  """
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  unet = config.unet
  levels = list(zip(unet.block_out_channels, unet.attention_levels))
  heads = {channels // unet.attention_head_dim for channels, attention in levels if attention}
  heads.add(unet.block_out_channels[-1] // unet.attention_head_dim)  # The mid block.
  if len(heads) != 1:
    raise ValueError(f"diffusers' UNet3DConditionModel needs one head count; levels give {heads}.")
  torch.manual_seed(0)
  return diffusers.UNet3DConditionModel(
      sample_size=config.data.image_size // config.autoencoder.patch_size,
      in_channels=2 * config.autoencoder.latent_channels,
      out_channels=config.autoencoder.latent_channels,
      down_block_types=tuple("CrossAttnDownBlock3D" if a else "DownBlock3D" for _, a in levels),
      up_block_types=tuple("CrossAttnUpBlock3D" if a else "UpBlock3D" for _, a in levels[::-1]),
      block_out_channels=tuple(unet.block_out_channels), layers_per_block=unet.layers_per_block,
      norm_num_groups=unet.norm_num_groups, cross_attention_dim=unet.cross_attention_dim,
      attention_head_dim=heads.pop()).eval()
