"""ldpipe: offline teacher cache and localization distillation for dense detectors."""
__version__ = "0.2.0"
