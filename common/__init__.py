"""Shared, torch-free infrastructure: args, logging, gRPC bootstrap, errors and the step-protocol domain types."""
