"""2D/3D student networks that expose logits and multi-scale decoder features, and the projector."""
