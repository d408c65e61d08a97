"""covidctnet: COVID-19 / CAP / control diagnosis from chest CT following CovidCTNet (Javaheri et al., 2021).

Importing the package is cheap: heavy dependencies (torch, MONAI) are imported by the modules that need them.
"""

__version__ = "0.1.0"

from covidctnet.core.labels import CLASS_NAMES

__all__ = ["CLASS_NAMES", "__version__"]
