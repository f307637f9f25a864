"""``python -m sfjax.parallel``: see :func:`sfjax.parallel.launch.main`."""

from sfjax.parallel.launch import main

main()
