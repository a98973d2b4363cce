"""Virtual model names to deployments."""
