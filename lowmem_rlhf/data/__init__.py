"""Data formats -> tokenised examples: loading rows, the shared chat rendering, prompt masking, collators."""
