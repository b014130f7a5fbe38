"""latentsearch gRPC API."""
