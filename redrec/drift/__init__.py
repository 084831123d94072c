"""Drift monitoring per scenario (Evidently) and the retraining trigger; see monitoring/README.md."""
