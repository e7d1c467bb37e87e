"""sslfw: distributed semi-supervised training for blind image-quality assessment."""

__version__ = "0.1.0"
