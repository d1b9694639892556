"""monai-ssl: registration-guided semi-supervised segmentation of 3D volumes with MONAI.

The top-level package imports nothing heavy, so that torch-free parts (the datalist, the
registration batch job's workers) stay light to import.
"""

__version__ = "0.1.0"
