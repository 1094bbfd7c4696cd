"""Shared pytest settings: a hypothesis profile that keeps CI quick."""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
  "ci",
  max_examples=40,
  deadline=None,
  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
  print_blob=True,
)
settings.register_profile("thorough", parent=settings.get_profile("ci"), max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
