"""A declarative, Hydra-configured big-model inference runner.

The Python API: ``Engine`` (load once, then ``generate``), ``SamplingParams`` and the ``Completion``
each prompt gets back. They are imported on first use, so ``import runner`` stays light.
"""

__version__ = "0.1.0"

_API = {"Engine": "runner.infer.engine", "SamplingParams": "runner.infer.sampling", "Completion": "runner.infer.generate"}
__all__ = ["Completion", "Engine", "SamplingParams", "__version__"]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'runner' has no attribute {name!r}")
