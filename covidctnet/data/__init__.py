"""Datasets: control slices, residual volumes, UCSD COVID-CT slices; split handling."""
