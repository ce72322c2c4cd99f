"""Data tools of the Wan-Animate-2 family only: driving videos for real clips (``appearance``)."""
