"""A declarative, Hydra-configured big-model inference runner."""

__version__ = "0.1.0"
