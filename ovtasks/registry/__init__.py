"""Stage 6: MLflow registration, the promotion gate, champion / challenger, serving."""
