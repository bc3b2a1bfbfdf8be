"""The one way any part opens a gRPC channel to another part."""
