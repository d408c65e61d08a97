"""Inference stage: new modules (slice scores); residuals and predict move here later."""
