"""Test-suite settings: one intra-op thread per worker (the suite runs under pytest-xdist,
and the tensors here are tiny: extra threads only contend), and a bounded hypothesis profile."""

import torch

torch.set_num_threads(1)

# --- hypothesis profiles (tests/test_properties.py) ---------------------------------------------
# "ci" (the default): derandomized, so that a CI run is reproducible and never flaky, no deadline
# (a loaded 2-core runner is slow), and the example counts written in each test. "dev": random
# examples, the same counts. "thorough": random, ten times the counts (HYPOTHESIS_PROFILE=thorough).
# Tests scale their counts by ``settings.default.max_examples / 100``.
import os  # noqa: E402

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=100, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=100, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=1000, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
