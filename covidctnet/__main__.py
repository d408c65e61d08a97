"""``python -m covidctnet``: the command line, for where the console script is not on PATH (e.g. under torchrun:
``torchrun --nproc_per_node 2 -m covidctnet train-denoiser ...``)."""

from covidctnet.cli import main

main()
