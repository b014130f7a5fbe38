"""Generated gRPC API packages (see proto/ and scripts/gen_proto.py)."""
