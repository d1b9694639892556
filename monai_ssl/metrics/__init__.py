"""Per-volume, per-class segmentation metrics in millimetres, and evaluation reports."""
