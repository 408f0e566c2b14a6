"""Loading published checkpoints (LISA, segment-anything) into segapp's own modules."""

from segapp.checkpoints.state import Source, StoredTensors, index_checkpoint, load_strict

__all__ = ["Source", "StoredTensors", "index_checkpoint", "load_strict"]
