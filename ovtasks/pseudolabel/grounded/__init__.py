"""The grounded generator: Grounding-DINO boxes prompted with object names, SAM masks in them."""
