"""From an HU volume to the network grid: the MONAI transform chain, the official profile, Perlin noise, lung masks."""
