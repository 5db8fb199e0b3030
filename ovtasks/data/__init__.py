"""Data sets: clean-shard reading, COCO ground truth, the synthetic LAION generator, SA-1B-format masks."""
