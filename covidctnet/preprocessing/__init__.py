"""Preprocessing stage: transforms, noise and the 3D lung mask (new modules; the rest moves here later)."""
