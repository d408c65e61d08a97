"""The one training loop and what each model adds to it: denoiser, 3D classifier, slice model, SimCLR, ensembles."""
