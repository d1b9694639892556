"""Data layer: datalists and splits, converters, validation, volume pipeline, slice sampling, registered labels.

Submodules are imported explicitly (``from monai_ssl.data.datalist import ...``) so that the torch-free
parts stay cheap to import.
"""
