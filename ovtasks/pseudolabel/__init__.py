"""Stage 2: object names, boxes and pseudo-masks for clean shards (maskfree or grounded generators)."""
