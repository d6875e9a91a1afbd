"""What is read and written on disk: `checkpoints` (Orbax), `video_files` (videos, images,
contact sheets), `mismatch` (the report of tensors a weights file lacks, adds or misshapes)."""
