"""Networks: BCDU-Net denoiser (with its ConvLSTM), the CovidCTNet 3D CNN and the 2D slice-model factory; the registry
that builds and loads each of them from a model directory; the import of the official Keras weights."""
