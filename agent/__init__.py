"""edge-agent: runs quantized models on the device and reports aggregated telemetry.

The version is a constant (pyproject reads it from here): importlib.metadata would cost the device ~3 MB of RSS.
"""

__version__ = "0.1.0"
