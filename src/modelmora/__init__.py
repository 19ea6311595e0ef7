"""ModelMora: one server for many PyTorch models."""

__version__ = "0.1.0"
