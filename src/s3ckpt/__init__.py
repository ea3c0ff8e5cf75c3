"""s3ckpt: PyTorch and Lightning checkpoints on S3."""
