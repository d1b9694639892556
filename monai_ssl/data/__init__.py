"""Data layer: where each data concept lives (one home each).

- :mod:`.datalist`: the datalist format (semi-supervised groups), patient-level splits, the per-case seed.
- :mod:`.validation`: the one input validator and its error type ``InputError`` (torch-free; the registration
  job uses it too), plus the trailing-singleton squeeze of volumes.
- :mod:`.geometry`: the one slice-axis rule (torch-free).
- :mod:`.converters`: public dataset layouts (ACDC, Synapse/BTCV) to datalists.
- :mod:`.transforms`, :mod:`.pipeline`: MONAI dictionary transforms (and the one spacing default
  ``DEFAULT_PIXDIM``) and the datasets bundles build; registered labels are read through
  :mod:`registration.layout`.
- :mod:`.slices`: 2.5D slice / 3D patch sampling (class-balanced draws, ``pixel_to_world``), mixed batches.
- :mod:`.views`: invertible batched views for consistency and contrastive losses.
- :mod:`.scribbles`, :mod:`.label_noise`: synthetic weak labels for the scribble and noisy-label methods.

The demo dataset builder is its own package, :mod:`monai_ssl.demo`. Submodules are imported explicitly
(``from monai_ssl.data.datalist import ...``) so that the torch-free parts stay cheap to import.
"""
