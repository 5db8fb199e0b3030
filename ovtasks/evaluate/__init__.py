"""Stage 5: COCO mask AP50 (base / novel) of models and of pseudo-labels."""
