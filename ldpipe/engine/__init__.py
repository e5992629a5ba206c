"""Training, inference and evaluation loops for ldpipe."""
