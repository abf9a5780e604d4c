"""Serving: a Ray Serve application and a Triton Inference Server model repository."""
