"""Test-suite settings: one intra-op thread per worker (the suite runs under pytest-xdist,
and the tensors here are tiny: extra threads only contend), and a bounded hypothesis profile."""

import torch

torch.set_num_threads(1)
