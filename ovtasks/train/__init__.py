"""Stage 4: trainers (OV Mask R-CNN, Semantic-SAM, and the ITM / WSPN the maskfree generator uses)."""
