"""The evaluation's feature networks, not the generative model: `clip` (CLIPSIM), `i3d` (FVD),
`inception_fid` (FID) and `torch_checkpoint` (reads their torch weight files without torch)."""
