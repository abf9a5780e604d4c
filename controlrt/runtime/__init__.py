"""Runtime: sessions, backends, the denoise loop and the Pipeline API."""
