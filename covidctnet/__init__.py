"""covidctnet: COVID-19 / CAP / control diagnosis from chest CT following CovidCTNet (Javaheri et al., 2021).

Importing the package is cheap: heavy dependencies (torch, MONAI) are imported by the modules that need them.
"""

__version__ = "0.1.0"

CLASS_NAMES: tuple[str, ...] = ("control", "covid", "cap")
"""Class order of the 3D classifier (index 0, 1, 2), as in the official CovidCTNet model."""

__all__ = ["CLASS_NAMES", "__version__"]
