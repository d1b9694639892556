"""Volume inference: slice-wise or sliding-window prediction restored onto the input's own grid.

- :mod:`.volume`: list and check inputs, invertible preprocessing, predict, invert, write (``save_nifti``).
- :mod:`.inferers`: ``VolumeInferer`` (slice-wise with 2.5D context, or sliding window).
- :mod:`.record`: the model's record of its preprocessing (``model.json``), read by evaluation and inference.
"""
