"""The campaign controller: the campaign registry over gRPC (issue #16)."""
