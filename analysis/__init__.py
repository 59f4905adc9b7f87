"""Reading timelines, detecting onsets, inferring the order primitives are learned in."""
