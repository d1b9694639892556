"""Ignite handler that fills a :class:`SegmentationReport` from an evaluator running inference.

Predictions arrive already inverted onto each input's own grid; the handler reads the original label file
(``label_path``) and image, so Dice, IoU, HD95 and boundary F1 are measured where the expert drew the label, in
millimetres of that grid, and never on a resampled copy.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
from ignite.engine import Engine, Events

from monai_ssl.metrics.report import SegmentationReport

__all__ = ["SegmentationReportHandler"]


class SegmentationReportHandler:
    """Add each evaluated case to ``report`` and write its CSV files when the evaluator completes.

    The metric settings (e.g. the boundary F1 tolerance, ``bf1_tolerance_mm``) are the report's.
    """

    def __init__(
        self,
        report: SegmentationReport,
        pred_key: str = "pred",
        label_path_key: str = "label_path",
        image_key: str = "image",
    ):
        self.report, self.pred_key, self.label_path_key, self.image_key = report, pred_key, label_path_key, image_key

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.add_cases)
        engine.add_event_handler(Events.COMPLETED, lambda _: self.report.write())

    def add_cases(self, engine: Engine) -> None:
        batch, output = engine.state.batch, engine.state.output
        if isinstance(batch, dict):
            raise ValueError("SegmentationReportHandler needs a decollated evaluator (decollate=True)")
        for item, out in zip(batch, output, strict=True):
            label_img = nib.load(item[self.label_path_key])
            image_path = str(item[self.image_key].meta.get("filename_or_obj", ""))
            image = (
                np.asarray(nib.load(image_path).dataobj, dtype=np.float32)
                if image_path.endswith(("nii", "gz"))
                else None
            )
            pred = np.asarray(out[self.pred_key].detach().cpu())[0]
            self.report.add_case(
                str(item.get("case_id", image_path)),
                pred.astype(np.int64),
                np.asarray(label_img.dataobj).astype(np.int64),
                spacing=tuple(float(z) for z in label_img.header.get_zooms()[:3]),
                image=image,
            )

    def __repr__(self) -> str:
        return f"SegmentationReportHandler({self.report.output_dir})"
