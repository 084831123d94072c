"""Online serving: config, model registry (BentoML model store), the recommendation engine behind
the BentoML service in ``bentos/``, and a local ``bentoml serve`` launcher."""
