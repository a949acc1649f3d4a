"""Side-by-side benchmarks of the proxy against nginx and HAProxy (not tests): see README.md."""
