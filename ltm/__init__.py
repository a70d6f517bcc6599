"""ltm: Learning to Mask for generalizable face-forgery detection, trained at scale."""

__version__ = "0.1.0"
