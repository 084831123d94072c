"""Items after training: checking, embedding and onboarding new items into the served models."""
