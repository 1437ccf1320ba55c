"""clothcli: fine-tune and analyse image classifiers for datasets laid out as split/class/image."""

__version__ = "0.2.0"
