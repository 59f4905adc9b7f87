"""File formats, torch-free: the timeline schema and reader, the LLC sidecar file, what W&B wrote to disk."""
