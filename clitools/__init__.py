"""Helpers shared by the command-line tools (bench, demo, feed): nothing here is part of the model or a service."""
