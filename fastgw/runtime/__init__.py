"""Processes and configuration: the command line, config files, the supervisor, workers and the admin port."""
