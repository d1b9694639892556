"""Registration settings and the elastix parameter maps built from them (plain dicts; no ITK import here).

Two kinds:

* ``affine``: multi-resolution affine with Mattes mutual information and adaptive stochastic gradient descent.
* ``bspline``: the same affine stage followed by a B-spline stage (mutual information only, no bending
  penalty) with a final grid spacing in mm; the default grid is ``max(20 mm, 2 x the largest voxel spacing)``,
  i.e. at least twice the slice spacing, because finer grids were slower and worse on thick slices.

The image pyramids are anisotropic: a level shrinks/smooths each axis by ``factor * min_spacing / spacing``
(at least 1), so thick-slice axes are not blurred across the few slices they have.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

__all__ = ["KINDS", "RegistrationSettings", "default_grid_mm", "parameter_maps"]

KINDS = ("affine", "bspline")
ParameterMap = dict[str, list[str]]


@dataclass(frozen=True)
class RegistrationSettings:
    """User-level settings of one registration kind; every pair of a job uses the same settings."""

    kind: str = "affine"
    grid_mm: float | None = None  # B-spline final grid spacing; None: max(20, 2 x largest spacing)
    resolutions: int = 3
    affine_iterations: int = 256
    bspline_iterations: int = 150
    samples: int = 2048
    seed: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown registration kind {self.kind!r}; expected one of {KINDS}")
        if self.grid_mm is not None and self.grid_mm <= 0:
            raise ValueError(f"grid_mm must be positive, got {self.grid_mm}")
        if self.resolutions < 1 or self.affine_iterations < 1 or self.bspline_iterations < 1 or self.samples < 64:
            raise ValueError(f"invalid registration settings {self}")

    def digest(self) -> str:
        """Short stable hash: a finished pair is reused only when it was computed with equal settings."""
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]

    def fallback(self) -> RegistrationSettings:
        """Settings of the single retry: more samples and iterations, one resolution level fewer."""
        return replace(
            self,
            samples=self.samples * 4,
            affine_iterations=self.affine_iterations * 2,
            resolutions=max(1, self.resolutions - 1),
        )


def default_grid_mm(spacing: Sequence[float]) -> float:
    """Default B-spline grid spacing: at least 20 mm and at least twice the largest (slice) spacing."""
    return float(max(20.0, 2.0 * max(spacing)))


def _schedule(spacing: Sequence[float], resolutions: int) -> list[str]:
    """Anisotropic pyramid schedule: per level, factor 2^(levels-1-r) scaled down on coarse axes."""
    smallest = min(spacing)
    out = []
    for r in range(resolutions):
        factor = 2 ** (resolutions - 1 - r)
        out += [str(max(1, round(factor * smallest / s))) for s in spacing]
    return out


def parameter_maps(
    settings: RegistrationSettings, fixed_spacing: Sequence[float], fallback: bool = False
) -> list[ParameterMap]:
    """The elastix parameter maps (one per stage) for a pair whose fixed image has ``fixed_spacing`` (mm)."""
    s = settings.fallback() if fallback else settings
    schedule = _schedule(fixed_spacing, s.resolutions)
    common: ParameterMap = {
        "FixedInternalImagePixelType": ["float"],
        "MovingInternalImagePixelType": ["float"],
        "FixedImagePyramid": ["FixedSmoothingImagePyramid"],
        "MovingImagePyramid": ["MovingSmoothingImagePyramid"],
        "NumberOfResolutions": [str(s.resolutions)],
        "FixedImagePyramidSchedule": schedule,
        "MovingImagePyramidSchedule": schedule,
        "Metric": ["AdvancedMattesMutualInformation"],
        "NumberOfHistogramBins": ["32"],
        "Optimizer": ["AdaptiveStochasticGradientDescent"],
        "AutomaticParameterEstimation": ["true"],
        "ImageSampler": ["RandomCoordinate"],
        "NumberOfSpatialSamples": [str(s.samples)],
        "NewSamplesEveryIteration": ["true"],
        "MaximumNumberOfSamplingAttempts": ["8" if not fallback else "32"],
        "CheckNumberOfSamples": ["true" if not fallback else "false"],
        "RandomSeed": [str(s.seed)],
        "Interpolator": ["LinearInterpolator"],
        "ResampleInterpolator": ["FinalLinearInterpolator"],
        "Resampler": ["DefaultResampler"],
        "DefaultPixelValue": ["0"],
        "WriteResultImage": ["true"],
        "ResultImageFormat": ["nii"],
        "WriteIterationInfo": ["false"],
        "HowToCombineTransforms": ["Compose"],
    }
    affine = dict(
        common,
        Registration=["MultiResolutionRegistration"],
        Transform=["AffineTransform"],
        AutomaticScalesEstimation=["true"],
        AutomaticTransformInitialization=["true"],
        AutomaticTransformInitializationMethod=["CenterOfGravity" if fallback else "GeometricalCenter"],
        MaximumNumberOfIterations=[str(s.affine_iterations)],
    )
    if s.kind == "affine":
        return [affine]
    grid = s.grid_mm if s.grid_mm is not None else default_grid_mm(fixed_spacing)
    bspline = dict(
        common,
        Registration=["MultiResolutionRegistration"],
        Transform=["BSplineTransform"],
        FinalGridSpacingInPhysicalUnits=[f"{grid:g}"],
        GridSpacingSchedule=[str(2 ** (s.resolutions - 1 - r)) for r in range(s.resolutions)],
        MaximumNumberOfIterations=[str(s.bspline_iterations)],
    )
    return [affine, bspline]
