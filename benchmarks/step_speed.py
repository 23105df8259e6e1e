"""Optimizer step speed: descend against torch.optim, interleaved in one process.

The same as ``descend bench``; see :mod:`descend.cli.bench` for the method and the options::

    python benchmarks/step_speed.py            # all sets, about 10 minutes on 2 cores
    python benchmarks/step_speed.py --quick    # about a minute
"""

from descend.cli.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
