"""Networks: BCDU-Net denoiser (with its ConvLSTM), the CovidCTNet 3D CNN and the 2D slice-model factory."""
