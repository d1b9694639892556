"""Volume inference: slice-wise or sliding-window prediction restored onto the input's own grid."""
