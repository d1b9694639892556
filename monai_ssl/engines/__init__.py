"""The semi-supervised trainer (a MONAI/ignite engine) and its evaluator."""
